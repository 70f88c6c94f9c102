"""train.py then score.py on the shared local Ray cluster, Parquet read back with pyarrow."""

import io
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest

from anomaly_core import storage
from anomaly_core.data.datasets import mvtec_records
from anomaly_core.data.synthetic import generate
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.scoring.schema import COLUMNS
from anomaly_core.training import metrics
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


def test_train_then_score_on_two_workers_gives_one_row_per_image_and_a_report(data, tmp_path):
    model = str(tmp_path / "model")
    summary = train.main([
        "--data", data, "--category", "capsule", "--output", model, "--num-workers", "2",
        "--set", "backbone=mobilenet_v2", "--set", f"image_size={SIZE}", "--batch-size", "8",
        # decoded by Ray Data tasks, streamed to the workers as uint8 shards
        "--input-pipeline", "ray-data",
    ])
    artifact = ModelArtifact.load(model)
    assert artifact.training["workers"] == 2 and summary["train_images"] == 32
    assert summary["input_pipeline"] == "ray-data"
    assert artifact.training["last_epoch"]["images"] == 16  # rank 0's equal half of the stream
    assert artifact.calibration.method.startswith("quantile")

    inputs = tmp_path / "inputs" / "capsule" / "test"  # the MVTec layout: the report finds labels
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

    # The report of the run opens in a browser, without network, with every thumbnail.
    check_report(out, data, result, tmp_path)


def check_report(out: str, data: str, summary: dict, tmp_path) -> None:
    import datetime
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import report
    from tests.helpers import open_in_chromium

    # An earlier night of another run beside it: the report adds a per-day section.
    partition = summary["products"]["padim"]["partition"]
    first = sorted(storage.list_files(partition, extensions=[".parquet"]))[0]
    older = pq.read_table(first)
    older = older.set_column(older.schema.get_field_index("run_id"), "run_id",
                             pa.array(["older-run"] * older.num_rows))
    day = (datetime.date.fromisoformat(summary["day"]) - datetime.timedelta(days=1)).isoformat()
    earlier = tmp_path / "scores" / f"dt={day}" / "product=padim" / partition.rsplit("/", 1)[1]
    earlier.mkdir(parents=True)
    pq.write_table(older, earlier / "part-older.parquet")
    page = report.main(["--scores", out, "--labels", data, "--out", str(tmp_path / "report"),
                        "--top", "5", "--sample", "3"])
    text = open(page).read()
    for section in ("Top 5 most anomalous", "A random sample of 3", "Per day", day,
                    f"Against labels ({summary['scored']} labelled images)", "Run summary",
                    "ROC and PR curves", "validation scores", "Errors (3)", summary["run_id"]):
        assert section in text, section
    screenshot = os.path.join(os.path.dirname(__file__), "..", "..", "test-artifacts", "report.png")
    loaded = open_in_chromium(page, screenshot)
    assert loaded["thumbnails"] == 8 and loaded["broken"] == 0
    assert loaded["console"] == []
    assert [u for u in loaded["requests"] if u != "data:"] == [f"file://{page}"]  # no network
    assert os.path.getsize(screenshot) > 50_000


def test_a_tiled_fit_records_its_tiling_and_the_score_job_stitches_full_size_maps(data, tmp_path):
    # 96 px images as a 96 x 144 working size in 48 px tiles overlapping by half: 3 x 5 tiles,
    # each resized to the detector's 32 px and with its own statistics; the maps come back
    # stitched at the image's size.
    model = str(tmp_path / "model")
    train.main(["--data", data, "--category", "capsule", "--output", model,
                "--set", "backbone=resnet18", "--set", "weights=random", "--set", "image_size=32",
                "--tiled-size", "96", "144", "--tile", "48", "--tile-stride", "24",
                "--tile-batch", "7", "--tile-positions", "own", "--batch-size", "8"])
    artifact = ModelArtifact.load(model)
    assert artifact.input_size == (96, 144) and artifact.detector.tiling.tile == 48
    assert len(artifact.detector.position_stats) == 15
    out = str(tmp_path / "scores")
    summary = score.main(["--model", model, "--input", f"{data}/capsule/test", "--output", out,
                          "--batch-size", "4"])
    table = pads.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == summary["scored"] == len(storage.list_files(f"{data}/capsule/test"))
    from PIL import Image

    row = table.slice(0, 1).to_pylist()[0]
    assert Image.open(io.BytesIO(row["mask_png"])).size == (SIZE, SIZE)  # the image's own size
    with pytest.raises(ValueError, match="not a multiple of the stride"):
        train.main(["--data", data, "--category", "capsule", "--output", str(tmp_path / "bad"),
                    "--set", "backbone=resnet18", "--set", "weights=random",
                    "--tiled-size", "100", "144", "--tile", "48", "--tile-stride", "24"])
    with pytest.raises(ValueError, match="use tile positions 'shared'"):
        train.main(["--data", data, "--category", "capsule", "--output", str(tmp_path / "bad"),
                    "--detector", "stpm", "--set", "weights=random", "--tiled-size", "96", "96",
                    "--tile", "48", "--tile-positions", "own"])
