"""ModelArtifact: a directory (local or s3://) with model.json and weights.safetensors. No pickle.

Everything scoring needs is inside, the backbone's weights included, so scoring machines need
no model hub.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

import anomaly_core
from anomaly_core import storage
from anomaly_core.detectors import build_detector
from anomaly_core.detectors.base import AnomalyOutput, Detector, load_weights
from anomaly_core.evaluate import Calibration

FORMAT = "ray-anomaly-model"
SCHEMA_VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"


class ArtifactError(ValueError):
    """The artifact is missing, truncated, foreign or from a newer version; names the file."""


def fingerprint(uris: list[str]) -> str:
    """A stable digest of the training image list (order-independent)."""
    digest = hashlib.sha256()
    for uri in sorted(uris):
        digest.update(uri.encode() + b"\n")
    return digest.hexdigest()[:16]


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
        size = self.detector.config.image_size
        return (size, size)

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

    def save(self, uri: str, *, s3_endpoint: str | None = None) -> str:
        """Write weights then model.json (model.json last: its presence means complete)."""
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in self.detector.state_dict().items()}
        weights = save(state)
        self.model_version = hashlib.sha256(weights).hexdigest()[:12]
        self.created_at = self.created_at or datetime.now(UTC).isoformat(timespec="seconds")
        storage.write_bytes(storage.join(uri, WEIGHTS_FILE), weights, s3_endpoint=s3_endpoint)
        body = json.dumps(self.metadata(), indent=2, sort_keys=True).encode()
        storage.write_bytes(storage.join(uri, MODEL_FILE), body, s3_endpoint=s3_endpoint)
        return uri

    @staticmethod
    def read_metadata(uri: str, *, s3_endpoint: str | None = None) -> dict[str, Any]:
        """model.json alone (no weights): provenance, calibration and metrics."""
        meta_uri = storage.join(uri, MODEL_FILE)
        try:
            meta = json.loads(storage.read_bytes(meta_uri, s3_endpoint=s3_endpoint))
        except storage.StorageError as exc:
            raise ArtifactError(
                f"{meta_uri}: cannot read ({exc}); pass the directory that jobs/train.py wrote"
            ) from exc
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{meta_uri}: truncated or not JSON ({exc}); retrain or re-copy it") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ArtifactError(f"{meta_uri}: not a {FORMAT} artifact (foreign model.json)")
        if meta.get("schema_version", 0) > SCHEMA_VERSION:
            raise ArtifactError(
                f"{meta_uri}: schema version {meta['schema_version']} is newer than this package "
                f"reads ({SCHEMA_VERSION}); upgrade the package"
            )
        return meta

    @classmethod
    def load(
        cls, uri: str, *, s3_endpoint: str | None = None, device: str = "cpu"
    ) -> ModelArtifact:
        """Read an artifact directory; every failure names the file and what to do."""
        from safetensors.torch import load

        meta = cls.read_metadata(uri, s3_endpoint=s3_endpoint)
        weights_uri = storage.join(uri, WEIGHTS_FILE)
        try:
            data = storage.read_bytes(weights_uri, s3_endpoint=s3_endpoint)
        except storage.StorageError as exc:
            raise ArtifactError(f"{weights_uri}: cannot read ({exc})") from exc
        if hashlib.sha256(data).hexdigest()[:12] != meta.get("model_version"):
            raise ArtifactError(
                f"{weights_uri}: content does not match model.json's model_version "
                "(truncated or replaced); re-copy the whole artifact directory"
            )
        try:
            state = load(data)
            # The weights file holds the backbone too, so no hub access is needed here.
            config = dict(meta["config"], weights="random")
            detector = build_detector(meta["detector"], **config)
            load_weights(detector, state)
            detector.config.weights = meta["config"].get("weights", "imagenet")
            detector.weight_source = meta.get("weights", {}).get("source", "unknown")
        except Exception as exc:
            raise ArtifactError(f"{weights_uri}: does not load into {meta.get('detector')} ({exc})") from exc
        detector.to(device).eval()
        return cls(
            detector=detector,
            calibration=Calibration(**meta["calibration"]),
            validation_metrics=meta.get("validation_metrics", {}),
            training=meta.get("training", {}),
            model_version=meta["model_version"],
            created_at=meta.get("created_at", ""),
        )
