"""train.py then score.py on the shared local Ray cluster, Parquet read back with pyarrow."""

import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest

from anomaly_core import metrics, storage
from anomaly_core.artifact import ModelArtifact
from anomaly_core.data.datasets import mvtec_records
from anomaly_core.data.synthetic import generate
from anomaly_core.schema import COLUMNS
from jobs import score, train

SIZE = 96
# Measured on this data (seed 0, 96 px, 32 training images): ImageNet mobilenet_v2 gives image
# AUROC 0.90; random mobilenet_v2 / resnet18 weights give 0.49 / 0.64. 0.75 separates the two.
MIN_IMAGE_AUROC = 0.75

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, categories=["capsule"], size=SIZE, n_train=40, n_test_good=10, n_test_defect=4)
    return root


def test_train_then_score_on_two_workers_gives_one_row_per_image(data, tmp_path):
    model = str(tmp_path / "model")
    summary = train.main([
        "--data", data, "--category", "capsule", "--output", model, "--num-workers", "2",
        "--set", "backbone=mobilenet_v2", "--set", f"image_size={SIZE}", "--batch-size", "8",
    ])
    artifact = ModelArtifact.load(model)
    assert artifact.training["workers"] == 2 and summary["train_images"] == 32
    assert artifact.calibration.method.startswith("quantile")

    inputs = tmp_path / "inputs"
    shutil.copytree(f"{data}/capsule/test", inputs)
    (inputs / "bad").mkdir()
    (inputs / "bad" / "empty.png").write_bytes(b"")
    (inputs / "bad" / "notes.png").write_bytes(b"not an image at all")
    good = (inputs / "good" / "000.png").read_bytes()
    (inputs / "bad" / "truncated.png").write_bytes(good[: len(good) // 2])

    out = str(tmp_path / "scores")
    result = score.main(["--model", model, "--input", str(inputs), "--output", out,
                         "--batch-size", "8", "--num-actors", "1"])
    table = pads.dataset(out, format="parquet", partitioning="hive").to_table()
    rows = {r["uri"]: r for r in table.to_pylist()}
    listed = storage.list_files(str(inputs))
    assert table.num_rows == len(listed) == len(rows) == result["rows"]  # none lost, none twice
    assert set(COLUMNS) <= set(table.column_names)
    assert result["errors"] == 3
    for name in ("empty.png", "notes.png", "truncated.png"):
        row = rows[str(inputs / "bad" / name)]
        assert name in row["error"] and row["score"] is None and row["mask_png"] is None

    records = mvtec_records(data, "capsule", "test")
    labels = np.array([r.label for r in records])
    scores = np.array([rows[r.uri.replace(f"{data}/capsule/test", str(inputs))]["score"] for r in records])
    assert metrics.image_auroc(labels, scores) >= MIN_IMAGE_AUROC
    scored = [r for r in rows.values() if r["error"] is None]
    assert all(r["model_version"] == artifact.model_version for r in scored)
    assert all(0.0 <= r["score_normalized"] <= 1.0 for r in scored)
    assert all(r["is_anomalous"] == (r["score"] >= artifact.calibration.threshold) for r in scored)
