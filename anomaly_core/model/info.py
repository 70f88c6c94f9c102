"""What a driver reads of an artifact: model.json alone, checked, without torch (a job's driver
starts in a moment and never loads the weights; anomaly_core.model.artifact loads them)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from anomaly_core import storage
from anomaly_core.errors import ArtifactError
from anomaly_core.model.calibration import Calibration

FORMAT = "ray-anomaly-model"
SCHEMA_VERSION = 1
MODEL_FILE = "model.json"
VERSION_PATTERN = re.compile(r"[0-9a-f]{12,64}")


def read_metadata(uri: str) -> dict[str, Any]:
    """model.json alone (no weights), checked: format, schema version, model_version."""
    meta_uri = storage.join(uri, MODEL_FILE)
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
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
    # model_version names the cache folder and the expected digest: a hex string, nothing else.
    if not VERSION_PATTERN.fullmatch(str(meta.get("model_version", ""))):
        raise ArtifactError(
            f"{meta_uri}: model_version {meta.get('model_version')!r} is not a weights digest "
            "(edited or corrupt); retrain or re-copy the whole artifact directory"
        )
    return meta


@dataclass(frozen=True)
class ArtifactInfo:
    """What a driver needs from an artifact, read from model.json alone (weights never touched)."""

    uri: str
    name: str  # detector name
    family: str
    model_version: str
    input_size: tuple[int, int]
    calibration: Calibration
    config: dict[str, Any]
    validation_metrics: dict[str, float]
    training: dict[str, Any]
    created_at: str
    metadata: dict[str, Any]  # the whole model.json

    @classmethod
    def read(cls, uri: str) -> ArtifactInfo:
        """Read and check `<uri>/model.json`; errors name the file and what to do."""
        meta = read_metadata(uri)
        meta_uri = storage.join(uri, MODEL_FILE)
        try:
            size = meta.get("input_size") or [meta["config"]["image_size"]] * 2
            return cls(
                uri=uri,
                name=meta["detector"],
                family=meta.get("family", ""),
                model_version=meta["model_version"],
                input_size=(int(size[0]), int(size[1])),
                calibration=Calibration(**meta["calibration"]),
                config=dict(meta["config"]),
                validation_metrics=meta.get("validation_metrics", {}),
                training=meta.get("training", {}),
                created_at=meta.get("created_at", ""),
                metadata=meta,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(
                f"{meta_uri}: missing or malformed field ({type(exc).__name__}: {exc}); "
                "retrain or re-copy the whole artifact directory"
            ) from exc
