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
    assert rows and all(r["product"] == product and r["registered_version"] == 1 for r in rows)
    assert all(r["model_version"] == expected for r in rows)
    success = json.loads(open(os.path.join(
        tmp_path, "scores-1", "_runs", summary["run_id"], "_SUCCESS.json")).read())
    assert success["registered"]["version"] == 1 and success["registered"]["product"] == product
    assert success["model_uri"] == os.path.abspath(tmp_path / "v1")

    models.main(["promote", product])  # the candidate, version 2, goes live
    _, rows = _score(f"models:/{product}@champion", data, str(tmp_path / "scores-2"))
    expected = read_metadata(str(tmp_path / "v2"))["model_version"]
    assert {(r["registered_version"], r["model_version"]) for r in rows} == {(2, expected)}

    models.main(["rollback", product])
    assert registry.resolve(f"models:/{product}@champion").version == 1
    run = registry.resolve(f"models:/{product}/1")
    assert run.tags["fingerprint"] == read_metadata(str(tmp_path / "v1"))["training"]["fingerprint"]
