"""jobs.score --fleet: every product's images in one run, each through its registered model."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import duckdb
import pandas as pd
import pytest
import torch

from anomaly_core.data.datasets import ImageDataset, mvtec_records
from anomaly_core.data.synthetic import generate
from anomaly_core.detectors import build_detector
from anomaly_core.model import registry
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.model.info import read_metadata
from anomaly_core.training.evaluate import calibrate, predict
from anomaly_core.training.fit import fit
from jobs import score

pytestmark = pytest.mark.usefixtures("ray_cluster")
# Two products of different input sizes (one batch can hold both: a ragged image column).
SIZES = {"capsule": 64, "metal_nut": 48}


@pytest.fixture(scope="module")
def plant(tmp_path_factory) -> dict:
    """Synthetic capsule and metal_nut images as two products, each with a registered PaDiM
    (version 1, champion), and a third product with images but no model."""
    tag = uuid.uuid4().hex[:6]
    data = str(tmp_path_factory.mktemp("synthetic"))
    generate(data, categories=list(SIZES), size=64, n_train=10, n_test_good=12, n_test_defect=4)
    products = {}
    for category, size in SIZES.items():
        torch.manual_seed(0)
        detector = build_detector("padim", backbone="mobilenet_v2", image_size=size,
                                  layers=["layer2"])
        train = ImageDataset(mvtec_records(data, category, "train"), (size, size))
        fit(detector, train, batch_size=5)
        pred = predict(detector, train)
        path = str(tmp_path_factory.mktemp(f"model-{category}"))
        ModelArtifact(detector, calibrate(pred["scores"], pred["maps"], pred["labels"])[0]).save(path)
        product = f"{category}-{tag}"
        registry.log_training(product, source=path, detector="padim", params={}, metrics={},
                              history=[], summary={}, tags={
                                  "model_version": read_metadata(path)["model_version"]})
        products[product] = category
    products[f"ghost-{tag}"] = "capsule"  # images, never registered
    return {"data": data, "products": products, "tag": tag}


def plant_input(plant: dict, dest, copies: int = 1) -> str:
    """<dest>/<day>/product=<name>/<image>: the products as a plant's cameras write them."""
    for product, category in plant["products"].items():
        folder = dest / "2026-12-01" / f"product={product}"
        folder.mkdir(parents=True)
        for src in sorted((os.path.join(r, f) for r, _, fs in
                           os.walk(f"{plant['data']}/{category}/test") for f in fs)):
            for k in range(copies):
                name = src.split("/test/", 1)[1].replace("/", "_")
                shutil.copy(src, folder / f"{k:02d}-{name}")
    return str(dest)


def run_score(*args: str) -> dict:
    return score.main([*args, "--batch-size", "4", "--rows-per-file", "6",
                       "--progress-every", "0"])


def test_fleet_scores_each_product_with_its_model_and_eviction_changes_no_score(plant, tmp_path):
    source = plant_input(plant, tmp_path / "in")
    out = str(tmp_path / "fleet")
    # A budget below one model: every switch of product evicts the other one.
    summary = run_score("--fleet", "--input", source, "--output", out, "--models-memory-mb", "0.01")
    rows = pd.read_parquet(out)
    ghost = f"ghost-{plant['tag']}"
    products = summary["products"]
    assert set(products) == set(plant["products"])
    for product in plant["products"]:
        mine = rows[rows["product"] == product]
        listed = len(os.listdir(f"{source}/2026-12-01/product={product}"))
        assert len(mine) == mine["uri"].nunique() == products[product]["inputs"] == listed
    errors = rows[rows["product"] == ghost]
    assert (errors["version"] == "none").all() and errors["score"].isna().all()
    assert errors["error"].str.contains(f"product '{ghost}' has no model registered as "
                                        f"models:/{ghost}@champion").all()
    scored = rows[rows["product"] != ghost]
    assert scored["error"].isna().all() and (scored["version"] == "1").all()
    loaded = summary["models_loaded"]
    assert loaded["loads"] >= 2 and loaded["evictions"] == loaded["loads"] - 1, loaded

    # The same images, one model at a time (its registry URI): the same scores.
    for product, category in plant["products"].items():
        if product == ghost:
            continue
        alone = str(tmp_path / f"alone-{category}")
        single = run_score("--model", f"models:/{product}@champion", "--input",
                           f"{source}/2026-12-01/product={product}", "--output", alone)
        assert single["products"][product]["version"] == "1"
        expected = pd.read_parquet(alone).set_index("uri")["score"]
        got = scored[scored["product"] == product].set_index("uri")["score"]
        assert len(expected) == len(got) > 0
        pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), rtol=1e-5,
                                       check_names=False)


def test_a_killed_fleet_run_resumes_with_no_row_lost_or_repeated_in_any_product(plant, tmp_path):
    import ray

    source = plant_input(plant, tmp_path / "in", copies=2)  # about 60 images a product
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.score", "--fleet", "--input", source, "--output", str(out),
           "--batch-size", "2", "--rows-per-file", "4", "--models-memory-mb", "0.01",
           "--address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("dt=*/product=*/version=1/*.parquet"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    glob = f"{out}/dt=*/product=*/version=*/*.parquet"
    partial = duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0]
    listed = {p: len(os.listdir(f"{source}/2026-12-01/product={p}")) for p in plant["products"]}
    assert 0 < partial < sum(listed.values()), "the kill must land mid-run"
    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    counts = duckdb.sql(
        f"select product, count(*), count(distinct uri), count(error) from read_parquet('{glob}',"
        " hive_partitioning = true) group by product order by product").fetchall()
    ghost = f"ghost-{plant['tag']}"
    assert counts == sorted((p, n, n, n if p == ghost else 0) for p, n in listed.items())
