"""Train registers, the models job promotes, the score job scores by alias and records the
version it resolved, in every row and in _SUCCESS.json (the shared local Ray, MLflow's embedded
store of the test session)."""

import json
import os
import uuid

import pyarrow.dataset as pads
import pytest

from anomaly_core.data.synthetic import generate
from anomaly_core.model import registry
from anomaly_core.model.info import read_metadata
from jobs import models, score, train

SIZE = 64
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, categories=["capsule"], size=SIZE, n_train=12, n_test_good=4, n_test_defect=2)
    return root


def _train(data: str, product: str, output: str, seed: int) -> dict:
    return train.main(["--data", data, "--category", "capsule", "--product", product,
                       "--output", output, "--seed", str(seed), "--set", "backbone=mobilenet_v2",
                       "--set", f"image_size={SIZE}", "--set", "n_features=16",
                       "--batch-size", "6"])


def _score(model: str, data: str, output: str) -> tuple[dict, list[dict]]:
    summary = score.main(["--model", model, "--input", f"{data}/capsule/test", "--output", output,
                          "--batch-size", "4", "--progress-every", "0"])
    rows = pads.dataset(output, format="parquet", partitioning="hive").to_table().to_pylist()
    return summary, rows


def test_train_registers_promote_moves_the_champion_and_scoring_by_alias_follows(data, tmp_path):
    product = f"capsule-{uuid.uuid4().hex[:6]}"
    first = _train(data, product, str(tmp_path / "v1"), seed=0)
    assert first["registered"]["version"] == 1
    assert first["registered"]["aliases"] == ["candidate", "champion"]
    second = _train(data, product, str(tmp_path / "v2"), seed=1)
    assert second["registered"]["version"] == 2 and second["registered"]["aliases"] == ["candidate"]

    summary, rows = _score(f"models:/{product}@champion", data, str(tmp_path / "scores-1"))
    expected = read_metadata(str(tmp_path / "v1"))["model_version"]
    assert rows and all(r["product"] == product and r["version"] == 1 for r in rows)
    assert all(r["model_version"] == expected for r in rows)
    success = json.loads(open(os.path.join(
        tmp_path, "scores-1", "_runs", summary["run_id"], "_SUCCESS.json")).read())
    scored = success["products"][product]
    assert (scored["product"], scored["registered"], scored["alias"]) == (product, 1, "champion")
    assert scored["model_uri"] == os.path.abspath(tmp_path / "v1")

    models.main(["promote", product])  # the candidate, version 2, goes live
    _, rows = _score(f"models:/{product}@champion", data, str(tmp_path / "scores-2"))
    expected = read_metadata(str(tmp_path / "v2"))["model_version"]
    assert {(r["version"], r["model_version"]) for r in rows} == {(2, expected)}

    models.main(["rollback", product])
    assert registry.resolve(f"models:/{product}@champion").version == 1
    run = registry.resolve(f"models:/{product}/1")
    assert run.tags["fingerprint"] == read_metadata(str(tmp_path / "v1"))["training"]["fingerprint"]
    summary = json.loads((tmp_path / "v1" / "train_summary.json").read_text())
    assert summary["registered"]["version"] == 1

    # A later fit into version 1's folder changes the weights under it: scoring it refuses.
    _train(data, product, str(tmp_path / "v1"), seed=2)
    with pytest.raises(ValueError, match="overwritten"):
        _score(f"models:/{product}/1", data, str(tmp_path / "scores-3"))


def test_a_fleet_trains_every_product_records_a_failure_and_a_rerun_skips_what_did_not_change(
        tmp_path):
    from jobs.common import JobFailed

    root = tmp_path / "plant"
    generate(str(root), categories=["capsule", "carpet"], size=SIZE, n_train=10, n_test_good=2,
             n_test_defect=1)
    tag = uuid.uuid4().hex[:6]
    for name in ("capsule", "carpet"):  # products of their own in the session's registry
        os.rename(root / name, root / f"{name}-{tag}")
    lonely = root / f"lonely-{tag}" / "train" / "good"  # one image: nothing to validate on
    lonely.mkdir(parents=True)
    (lonely / "000.png").write_bytes(
        next((root / f"capsule-{tag}" / "train" / "good").iterdir()).read_bytes())
    argv = ["--data", str(root), "--categories", "all", "--output", str(tmp_path / "models"),
            "--set", "backbone=mobilenet_v2", "--set", f"image_size={SIZE}",
            "--set", "n_features=16", "--batch-size", "6", "--max-concurrent", "2"]
    with pytest.raises(JobFailed, match=f"1 of 3 products failed: lonely-{tag}"):
        train.main(argv)
    summary = json.loads((tmp_path / "models" / "fleet_summary.json").read_text())
    status = {p["product"]: p for p in summary["products"]}
    assert status[f"lonely-{tag}"]["status"] == "failed"
    assert "validation" in status[f"lonely-{tag}"]["reason"]
    for name in ("capsule", "carpet"):
        product = status[f"{name}-{tag}"]
        assert product["status"] == "trained" and product["version"] == 1
        assert product["image_auroc"] is not None
        found = registry.resolve(f"models:/{name}-{tag}@champion")
        assert found.source == product["artifact"] and os.path.isfile(
            os.path.join(found.source, "model.json"))

    # Nothing changed but one image of carpet: only carpet trains again.
    changed = root / f"carpet-{tag}" / "train" / "good" / "000.png"
    changed.write_bytes(changed.read_bytes() + b"\0")
    with pytest.raises(JobFailed):
        train.main(argv)
    again = {p["product"]: p for p in json.loads(
        (tmp_path / "models" / "fleet_summary.json").read_text())["products"]}
    assert again[f"capsule-{tag}"]["status"] == "up to date"
    assert again[f"capsule-{tag}"]["version"] == 1
    assert again[f"carpet-{tag}"]["status"] == "trained" and again[f"carpet-{tag}"]["version"] == 2


def test_detector_auto_fits_each_candidate_keeps_the_best_objective_and_logs_them_all(
        data, tmp_path):
    from mlflow import MlflowClient

    product = f"auto-{uuid.uuid4().hex[:6]}"
    candidates = "padim:n_features=8;padim:n_features=16"
    summary = train.main(["--data", data, "--category", "capsule", "--product", product,
                          "--detector", "auto", "--auto-candidates", candidates,
                          "--output", str(tmp_path / "auto"), "--set", "backbone=mobilenet_v2",
                          "--set", f"image_size={SIZE}", "--batch-size", "6"])
    objectives = summary["auto_candidates"]
    assert set(objectives) == {"padim-n_features-8", "padim-n_features-16"}
    assert summary["auto_pick"] == max(objectives, key=lambda k: objectives[k])
    assert summary["artifact"] == str(tmp_path / "auto" / summary["auto_pick"])
    found = registry.resolve(f"models:/{product}@champion")
    assert found.source == summary["artifact"]
    run = MlflowClient(registry.tracking_uri()).get_run(found.run_id)
    assert run.data.params["auto_pick"] == summary["auto_pick"]
    assert {k for k in run.data.metrics if k.startswith("auto_objective.")} == {
        f"auto_objective.{k}" for k in objectives}

    # A plant with --detector auto: the same pick per product, and a rerun keeps it.
    argv = ["--data", data, "--categories", "capsule", "--detector", "auto",
            "--auto-candidates", candidates, "--output", str(tmp_path / "plant"),
            "--set", "backbone=mobilenet_v2", "--set", f"image_size={SIZE}", "--batch-size", "6",
            "--no-register"]
    fleet = train.main(argv)
    (capsule,) = fleet["products"]
    assert capsule["status"] == "trained" and capsule["detector"] in objectives
