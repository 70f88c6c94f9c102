"""The model registry (MLflow, an embedded SQLite store of the test session): register, promote,
roll back, resolve, history, the models job, and a registry that cannot be reached."""

import json
import socket
import time
import uuid

import pytest

from anomaly_core.errors import RegistryError
from anomaly_core.model import registry
from jobs import models


def _product() -> str:
    return f"washer-{uuid.uuid4().hex[:8]}"  # the session's store is shared by every test


def _register(product: str, source: str, history=()):
    return registry.log_training(
        product, source=source, detector="padim", params={"backbone": "resnet18", "epochs": 1},
        metrics={"val_image_auroc": 0.91, "threshold": 3.5}, history=history,
        summary={"artifact": source}, tags={"model_version": source[-6:]})


def test_first_version_goes_live_and_later_ones_wait_as_candidates():
    product = _product()
    first = _register(product, "/models/a-000001")
    assert (first.version, first.aliases) == (1, ("candidate", "champion"))
    second = _register(product, "/models/a-000002")
    assert (second.version, second.aliases) == (2, ("candidate",))
    assert registry.resolve(f"models:/{product}@champion").source == "/models/a-000001"
    assert registry.resolve(f"models:/{product}").version == 1  # no alias means champion
    assert registry.resolve(f"models:/{product}@candidate").source == "/models/a-000002"
    assert registry.resolve(f"models:/{product}/2").tags["model_version"] == "000002"


def test_promote_then_rollback_moves_the_champion_and_keeps_the_history():
    product = _product()
    for i in (1, 2, 3):
        _register(product, f"/models/b-{i}")
    assert registry.promote(product) == (1, 3)  # the candidate by default
    assert registry.resolve(f"models:/{product}@champion").version == 3
    assert registry.promote(product, version=2) == (3, 2)
    assert registry.rollback(product) == (2, 3)  # back to what it held before
    assert registry.resolve(f"models:/{product}@champion").version == 3
    moves = [(m["alias"], m["from"], m["to"]) for m in registry.history(product)
             if m["alias"] == "champion"]
    assert moves == [("champion", 2, 3), ("champion", 3, 2), ("champion", 1, 3),
                     ("champion", None, 1)]
    assert all(m["by"] for m in registry.history(product))


def test_rollback_without_an_earlier_champion_says_so():
    product = _product()
    _register(product, "/models/c-1")
    with pytest.raises(RegistryError, match="no other version"):
        registry.rollback(product)


def test_a_run_logs_parameters_validation_metrics_and_every_epoch():
    from mlflow import MlflowClient

    product = _product()
    history = [{"epoch": 0, "loss": 1.0, "val_image_auroc": 0.7},
               {"epoch": 1, "loss": 0.5, "val_image_auroc": 0.8}]
    version = _register(product, "/models/d-1", history)
    client = MlflowClient(registry.tracking_uri())
    run = client.get_run(version.run_id)
    assert run.data.params["backbone"] == "resnet18" and run.data.params["detector"] == "padim"
    assert run.data.metrics["val_image_auroc"] == pytest.approx(0.91)
    losses = client.get_metric_history(version.run_id, "epoch_loss")
    assert sorted((m.step, m.value) for m in losses) == [(0, 1.0), (1, 0.5)]
    assert run.data.tags["artifact_uri"] == "/models/d-1"


@pytest.mark.parametrize("uri, says", [
    ("models:/no-such-product@champion", "has no alias @champion"),
    ("models:/no-such-product/7", "has no version 7"),
    ("models:/", "not a registry URI"),
])
def test_an_unknown_product_version_or_uri_is_named(uri, says):
    with pytest.raises((RegistryError, ValueError), match=says):
        registry.resolve(uri)


def test_an_unreachable_registry_fails_fast_naming_its_uri(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    start = time.perf_counter()
    with pytest.raises(RegistryError, match=f"http://127.0.0.1:{port}.*MLFLOW_TRACKING_URI") as err:
        registry.resolve("models:/washer@champion")
    assert "secret" not in str(err.value)
    assert time.perf_counter() - start < 30


def test_the_models_job_lists_shows_promotes_and_rolls_back(capsys):
    product = _product()
    _register(product, "/models/e-1")
    _register(product, "/models/e-2")
    listed = models.main(["--json", "list"])
    mine = next(p for p in listed["products"] if p["product"] == product)
    assert (mine["champion"], mine["candidate"], mine["latest"]) == (1, 2, 2)
    assert models.main(["promote", product]) == {"product": product, "alias": "champion",
                                                  "from": 1, "to": 2}
    assert f"{product}@champion: version 1 -> 2" in capsys.readouterr().out
    assert models.main(["rollback", product])["to"] == 1
    shown = models.main(["show", product])
    text = capsys.readouterr().out
    assert [v["version"] for v in shown["versions"]] == [2, 1]
    assert "alias moves" in text and "/models/e-2" in text
    assert json.dumps(shown, default=str)  # what --json prints
    with pytest.raises(ValueError, match="no product"):
        models.main(["show", "never-registered"])
