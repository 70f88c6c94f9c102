"""jobs/tune.py: small CPU sweeps finish and rank, the best config trains a scoreable model, and
an interrupted sweep resumes without rerunning finished trials."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from anomaly_core.data.synthetic import generate
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.model.info import read_metadata
from jobs import tune

pytestmark = pytest.mark.usefixtures("ray_cluster")
TINY = ["--set", "backbone=mobilenet_v2", "--set", "image_size=48", "--batch-size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synthetic"))
    generate(root, categories=["capsule"], size=48, n_train=12, n_test_good=2, n_test_defect=1)
    return root


def test_simplenet_noise_sweep_in_s3_ranks_trials_and_its_best_config_trains_a_loadable_model(
        data, s3_bucket, s3_endpoint):
    from anomaly_core import storage

    out = f"{s3_bucket}/sweep"
    summary = tune.main(["--data", data, "--category", "capsule", "--detector", "simplenet", *TINY,
                         "--param", "noise_std=loguniform:0.03:1.0", "--num-samples", "2",
                         "--max-concurrent", "2", "--epochs", "2", "--output", out,
                         "--save-best-artifact", "--s3-endpoint", s3_endpoint])
    fs, path = storage.filesystem(f"{out}/results.parquet")
    table = pq.read_table(path, filesystem=fs).to_pylist()
    assert len(table) == 2 == summary["trials"]
    objectives = [r["objective"] for r in table if r["objective"] is not None]
    assert objectives == sorted(objectives, reverse=True) and len(objectives) == 2
    sigmas = {json.loads(r["param_noise_std"]) for r in table}
    assert len(sigmas) == 2 and all(0.03 <= s <= 1.0 for s in sigmas)
    best = yaml.safe_load(storage.read_bytes(f"{out}/best_config.yaml"))
    assert best["detector"] == "simplenet"
    assert best["options"]["noise_std"] == json.loads(table[0]["param_noise_std"])
    model = read_metadata(summary["best_model"])
    assert model["config"]["noise_std"] == best["options"]["noise_std"]
    # Each trial's Ray Train checkpoints sit in the sweep's S3 storage under the trial's id.
    checkpoints = storage.list_files(f"{out}/tune/sweep-simplenet-trials")
    assert {c.split("/trial-")[1].split("/")[0] for c in checkpoints if "/trial-" in c} == {
        r["trial_id"] for r in table}
    assert any(c.endswith("state.pt") for c in checkpoints)
    # The retrained best model loads (scoring any artifact is tested in test_score_job).
    loaded = ModelArtifact.load(summary["best_model"])
    assert loaded.detector.config.noise_std == best["options"]["noise_std"]


def test_bad_search_dimension_is_refused_before_ray(data, tmp_path):
    with pytest.raises(ValueError, match="no option"):
        tune.main(["--data", data, "--category", "capsule", "--detector", "simplenet",
                   "--param", "flow_steps=randint:2:8", "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="KIND"):
        tune.main(["--data", data, "--category", "capsule", "--detector", "simplenet",
                   "--param", "noise_std=lognormal:1:2", "--output", str(tmp_path)])


def test_fastflow_depth_grid_interrupted_resumes_without_rerunning_finished_trials(data, tmp_path):
    import ray

    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "jobs.tune", "--data", data, "--category", "capsule",
           "--detector", "fastflow", *TINY, "--set", "train_backbone=false",
           "--param", "flow_steps=grid:2,4", "--search", "grid", "--max-concurrent", "1",
           "--epochs", "1", "--output", str(out), "--address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished_trials() -> dict[str, str]:
        done = {}
        for path in (out / "tune" / "sweep-fastflow").glob("run_trial_*/result.json"):
            text = path.read_text()
            if text.strip():
                done[path.parent.name] = text
        return done

    deadline = time.time() + 300
    while time.time() < deadline and len(finished_trials()) < 1:
        time.sleep(0.2)
    time.sleep(1.0)  # let Tune write its experiment state after the trial's result
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = finished_trials()
    assert len(before) == 1, "the kill must land mid-sweep"
    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming sweep" in finished.stderr
    after = finished_trials()
    assert len(after) == 2
    for trial, text in before.items():
        assert after[trial] == text  # a finished trial was not run again
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(json.loads(r["param_flow_steps"]) for r in table) == [2, 4]  # each depth once
    assert all(r["status"] == "ok" and r["objective"] is not None for r in table)
    assert os.path.exists(out / "best_config.yaml")
    # One Ray Train run per trial, named after it in the sweep's storage: a restarted trial
    # found its own run (and checkpoint) again rather than starting a new one.
    runs = {p.name for p in (out / "tune" / "sweep-fastflow-trials").iterdir()}
    assert runs == {f"trial-{r['trial_id']}" for r in table}
