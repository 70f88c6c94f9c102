"""ModelArtifact: a directory (local or s3://) with model.json and weights.safetensors. No pickle.

Everything scoring needs is inside, the backbone's weights included, so scoring machines need
no model hub. Drivers read model.json alone (ArtifactInfo); loaders memory-map the weights from
the artifact itself or, for s3://, from a per-node cache, so a load holds one copy of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

import anomaly_core
from anomaly_core import storage
from anomaly_core.detectors import build_detector
from anomaly_core.detectors.base import AnomalyOutput, Detector, load_weights
from anomaly_core.detectors.tiling import input_size, tiled, tiling_of
from anomaly_core.errors import ArtifactError
from anomaly_core.model.calibration import Calibration
from anomaly_core.model.info import (
    FORMAT,
    MODEL_FILE,
    SCHEMA_VERSION,
    ArtifactInfo,
)

WEIGHTS_FILE = "weights.safetensors"
CACHE_ENV = "RAY_ANOMALY_CACHE"
VERIFIED_SUFFIX = ".verified"
CHUNK = 8 << 20

log = logging.getLogger(__name__)


def fingerprint(uris: list[str]) -> str:
    """A stable digest of the training image list (order-independent)."""
    digest = hashlib.sha256()
    for uri in sorted(uris):
        digest.update(uri.encode() + b"\n")
    return digest.hexdigest()[:16]


def default_cache_dir() -> str:
    """The node's artifact cache: $RAY_ANOMALY_CACHE, else ~/.cache/ray-anomaly/artifacts."""
    if os.environ.get(CACHE_ENV):
        return os.path.expanduser(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ray-anomaly", "artifacts")


def file_sha256(path: str) -> str:
    """sha256 hex of a local file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _mismatch(weights_uri: str) -> ArtifactError:
    return ArtifactError(
        f"{weights_uri}: content does not match model.json's model_version "
        "(truncated or replaced); re-copy the whole artifact directory"
    )


def _marked(path: str, marker: str, version: str) -> bool:
    """True when `marker` vouches for `path` as it is now (same digest, size, mtime, inode)."""
    try:
        with open(marker) as f:
            mark = json.load(f)
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return (
        isinstance(mark, dict)
        and str(mark.get("sha256", "")).startswith(version)
        and mark.get("size") == st.st_size
        and mark.get("mtime_ns") == st.st_mtime_ns
        and mark.get("inode") == st.st_ino
    )


def _mark(path: str, marker: str, digest: str) -> None:
    st = os.stat(path)
    body = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    tmp = f"{marker}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f)
    os.replace(tmp, marker)


@contextlib.contextmanager
def _node_lock(path: str, what: str) -> Iterator[None]:
    """An exclusive lock between the processes of one node (actors loading the same model)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process on this node to fetch %s", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock, also when the holder dies


def _cached(weights_uri: str, version: str, cache_dir: str) -> str:
    """The verified per-node copy of a remote weights file, downloaded at most once per node."""
    folder = os.path.join(cache_dir, version)
    path = os.path.join(folder, WEIGHTS_FILE)
    marker = path + VERIFIED_SUFFIX
    if _marked(path, marker, version):
        return path
    try:
        os.makedirs(folder, exist_ok=True)
        with _node_lock(os.path.join(folder, ".lock"), weights_uri):
            if _marked(path, marker, version):
                return path  # another loader on this node fetched it while we waited
            _fetch(weights_uri, version, path, marker)
    except OSError as exc:
        raise ArtifactError(
            f"{weights_uri}: the artifact cache folder {folder} is not usable ({exc}); "
            f"set {CACHE_ENV} to a writable folder with room for the weights"
        ) from exc
    return path


def _fetch(weights_uri: str, version: str, path: str, marker: str) -> None:
    """Under the node lock: reuse a present file that hashes right, else download and verify."""
    folder = os.path.dirname(path)
    for name in os.listdir(folder):
        if name.endswith(".tmp"):  # left by a loader that died mid-download
            os.remove(os.path.join(folder, name))
    if os.path.exists(path):
        # No or stale marker: a crash before marking, or the file changed since. Re-hash.
        digest = file_sha256(path)
        if digest.startswith(version):
            _mark(path, marker, digest)
            return
        log.warning("%s: cached copy of %s is corrupt; downloading it again", path, weights_uri)
        os.remove(path)
    tmp = os.path.join(folder, f".{WEIGHTS_FILE}.{uuid.uuid4().hex}.tmp")
    try:
        digest = storage.copy_file(weights_uri, tmp)
        if not digest.startswith(version):
            raise _mismatch(weights_uri)
        os.replace(tmp, path)
    except storage.StorageError as exc:
        raise ArtifactError(
            f"{weights_uri}: cannot download into the artifact cache {folder} ({exc}); "
            f"set {CACHE_ENV} elsewhere if that folder is the problem"
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _mark(path, marker, digest)
    log.info("cached %s at %s", weights_uri, path)


def weights_path(
    uri: str, model_version: str, *, cache_dir: str | None = None
) -> str:
    """A local weights file verified against `model_version`: the artifact's own for a local
    artifact, the node's cache entry (downloaded once, then trusted) for s3://."""
    weights_uri = storage.join(uri, WEIGHTS_FILE)
    if storage.is_s3(uri):
        return _cached(weights_uri, model_version, cache_dir or default_cache_dir())
    _, path = storage.filesystem(weights_uri)
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise ArtifactError(
            f"{weights_uri}: cannot read ({exc}); re-copy the whole artifact directory"
        ) from exc
    if not digest.startswith(model_version):
        raise _mismatch(weights_uri)
    return path


def _save_weights(state: dict[str, torch.Tensor], path: str, weights_uri: str) -> None:
    """safetensors straight from the tensors' memory to `path` (bytes identical to save())."""
    from safetensors.torch import save_file

    try:
        save_file(state, path)
    except Exception as exc:  # safetensors reports I/O failures as its own error type
        raise storage.StorageError(
            f"could not write {weights_uri} ({exc}); check free space and permissions"
        ) from exc
    # safetensors creates files 0600; other users (Ray workers, readers of a shared mount) need
    # the usual umask permissions that storage.write_bytes gives model.json.
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # not thread-safe, hence the /proc reading first
    os.umask(mask)
    return mask


@dataclass
class ModelArtifact:
    """A fitted detector with its calibration and provenance."""

    detector: Detector
    calibration: Calibration
    validation_metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # image count, fingerprint, epochs
    model_version: str = ""  # content digest of the weights, set by save() and load()
    created_at: str = ""

    @property
    def name(self) -> str:
        return self.detector.name

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the images the detector takes (the working size when tiled)."""
        return input_size(self.detector)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        """Raw detector output on float images [B,3,H,W] in [0,1] at `input_size`."""
        self.detector.eval()
        return self.detector(images)

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "detector": self.detector.name,
            "family": self.detector.family,
            "config": self.detector.config_dict(),
            "input_size": list(self.input_size),
            "tiling": tiling.to_dict() if (tiling := tiling_of(self.detector)) else None,
            "input_normalization": "RGB float in [0,1]; backbone normalization inside the model",
            "weights": {
                "backbone": getattr(self.detector.config, "backbone", ""),
                "source": self.detector.weight_source,
            },
            "calibration": self.calibration.to_dict(),
            "validation_metrics": self.validation_metrics,
            "training": self.training,
            "model_version": self.model_version,
            "package_version": anomaly_core.__version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "created_at": self.created_at,
        }

    def save(self, uri: str) -> str:
        """Write weights then model.json (model.json last: its presence means complete).

        The weights stream from the tensors to a file: no serialized copy in memory.
        """
        state = {k: v.detach().cpu().contiguous() for k, v in self.detector.state_dict().items()}
        weights_uri = storage.join(uri, WEIGHTS_FILE)
        if storage.is_s3(uri):
            # Staged on the node's cache disk, which is sized for weights; /tmp may be RAM.
            staging = default_cache_dir()
            try:
                os.makedirs(staging, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=staging, prefix=".save-") as tmp:
                    local = os.path.join(tmp, WEIGHTS_FILE)
                    _save_weights(state, local, weights_uri)
                    digest = storage.copy_file(local, weights_uri)
            except OSError as exc:
                raise storage.StorageError(
                    f"could not stage {weights_uri} in {staging} ({exc}); set {CACHE_ENV} to a "
                    "writable folder with room for the weights"
                ) from exc
        else:
            _, path = storage.filesystem(weights_uri)
            # Same-folder temp file: the rename is atomic, a reader never sees half a file.
            tmp = os.path.join(os.path.dirname(path), f".{WEIGHTS_FILE}.{uuid.uuid4().hex}.tmp")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _save_weights(state, tmp, weights_uri)
                digest = file_sha256(tmp)
                os.replace(tmp, path)
            except OSError as exc:
                raise storage.StorageError(f"could not write {weights_uri} ({exc})") from exc
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self.model_version = digest[:12]
        self.created_at = self.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        body = json.dumps(self.metadata(), indent=2, sort_keys=True).encode()
        storage.write_bytes(storage.join(uri, MODEL_FILE), body)
        return uri

    @classmethod
    def load(
        cls,
        uri: str,
        *,
        device: str = "cpu",
        cache_dir: str | None = None,
    ) -> ModelArtifact:
        """Read an artifact directory holding one copy of the weights; failures name the file.

        The weights are memory-mapped (from the artifact itself, or from the node's cache under
        `cache_dir` for s3://) and become the detector's tensors without a copy.
        """
        from safetensors.torch import load_file

        info = ArtifactInfo.read(uri)
        path = weights_path(uri, info.model_version, cache_dir=cache_dir)
        weights_uri = storage.join(uri, WEIGHTS_FILE)
        where = f"{weights_uri} (cached at {path})" if storage.is_s3(uri) else weights_uri
        try:
            state = load_file(path)  # mmap: pages come from the page cache, shared, as touched
            # The weights file holds the backbone too, so no hub access is needed here.
            detector = build_detector(info.name, **dict(info.config, weights="random"))
            detector = tiled(detector, info.metadata.get("tiling"))
            load_weights(detector, state)
            del state
            detector.config.weights = info.config.get("weights", "imagenet")
            detector.weight_source = info.metadata.get("weights", {}).get("source", "unknown")
        except Exception as exc:
            raise ArtifactError(f"{where}: does not load into {info.name} ({exc})") from exc
        detector.to(device).eval()
        return cls(
            detector=detector,
            calibration=info.calibration,
            validation_metrics=info.validation_metrics,
            training=info.training,
            model_version=info.model_version,
            created_at=info.created_at,
        )
