"""ModelArtifact: round trips on local disk and S3, and clear failures for bad artifacts."""

import json

import pytest
import torch

from anomaly_core import storage
from anomaly_core.artifact import ArtifactError, ModelArtifact
from anomaly_core.detectors import build_detector
from anomaly_core.evaluate import Calibration


@pytest.fixture(scope="module")
def artifact() -> ModelArtifact:
    torch.manual_seed(0)
    detector = build_detector("padim", backbone="resnet18", weights="random", image_size=64, n_features=16)
    for _ in range(2):
        detector.observe(torch.rand(4, 3, 64, 64))
    detector.finalize()
    calibration = Calibration(threshold=3.0, pixel_threshold=2.5, min=0.5, max=6.0, method="test")
    return ModelArtifact(detector, calibration, {"image_auroc": 0.9}, {"images": 8})


def _assert_same_predictions(a: ModelArtifact, b: ModelArtifact) -> None:
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out_a, out_b = a.predict(images), b.predict(images)
    assert torch.equal(out_a.score, out_b.score) and torch.equal(out_a.map, out_b.map)


def test_local_round_trip_scores_identically(tmp_path, artifact):
    artifact.save(str(tmp_path / "model"))
    loaded = ModelArtifact.load(str(tmp_path / "model"))
    _assert_same_predictions(artifact, loaded)
    assert loaded.calibration == artifact.calibration
    assert loaded.model_version == artifact.model_version and len(loaded.model_version) == 12
    assert loaded.detector.config == artifact.detector.config
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["schema_version"] == 1 and meta["detector"] == "padim"
    assert meta["input_size"] == [64, 64] and meta["validation_metrics"] == {"image_auroc": 0.9}
    assert meta["weights"]["source"] == "random"
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "weights.safetensors"]


def test_s3_round_trip_scores_identically(s3_bucket, s3_endpoint, artifact):
    uri = f"{s3_bucket}/models/padim"
    artifact.save(uri, s3_endpoint=s3_endpoint)
    _assert_same_predictions(artifact, ModelArtifact.load(uri, s3_endpoint=s3_endpoint))


def test_same_weights_give_the_same_model_version(tmp_path, artifact):
    artifact.save(str(tmp_path / "a"))
    version = artifact.model_version
    artifact.save(str(tmp_path / "b"))
    assert artifact.model_version == version


def test_truncated_weights_fail_naming_the_file(tmp_path, artifact):
    path = tmp_path / "model"
    artifact.save(str(path))
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        ModelArtifact.load(str(path))


def test_truncated_model_json_fails_naming_the_file(tmp_path, artifact):
    path = tmp_path / "model"
    artifact.save(str(path))
    meta = path / "model.json"
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(ArtifactError, match="model.json: truncated"):
        ModelArtifact.load(str(path))


def test_foreign_directory_is_rejected(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"architectures": ["ViTModel"]}))
    with pytest.raises(ArtifactError, match="foreign"):
        ModelArtifact.load(str(tmp_path))


def test_missing_artifact_says_what_to_pass(tmp_path):
    with pytest.raises(ArtifactError, match="jobs/train.py"):
        ModelArtifact.load(str(tmp_path / "nothing"))


def test_newer_schema_asks_for_an_upgrade(tmp_path, artifact):
    artifact.save(str(tmp_path))
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["schema_version"] = 99
    storage.write_bytes(str(tmp_path / "model.json"), json.dumps(meta).encode())
    with pytest.raises(ArtifactError, match="upgrade"):
        ModelArtifact.load(str(tmp_path))
