"""jobs/train.py survives a worker killed mid-run: Ray Train restarts it from the last checkpoint."""

import os
import signal
import threading
import time

import pytest

from anomaly_core.data.synthetic import generate
from anomaly_core.model.artifact import ModelArtifact
from jobs import train
from tests.helpers import pids_named

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    data = str(tmp_path / "data")
    generate(data, categories=["capsule"], size=64, n_train=24, n_test_good=2, n_test_defect=1)
    results = tmp_path / "ray_results"
    killed: list[int] = []

    def kill_after_a_registered_checkpoint() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            # A checkpoint folder appears before Ray registers it; the controller's snapshot
            # appears once one is registered, so a restart after that must begin from it.
            if any(results.glob("**/checkpoint_manager_snapshot.json")):
                pids = pids_named(b"RayTrainWorker")
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_a_registered_checkpoint, daemon=True)
    killer.start()
    summary = train.main([
        "--data", data, "--category", "capsule", "--output", str(tmp_path / "model"),
        "--detector", "autoencoder", "--set", "image_size=64", "--epochs", "6",
        "--batch-size", "4", "--num-workers", "2", "--storage-path", str(results),
        "--max-failures", "2",
    ])
    killer.join(timeout=1)
    assert killed, "no worker was killed: the run ended before a checkpoint was registered"
    assert summary["resumed_from_epoch"] >= 0  # restarted from a checkpoint, not from scratch
    artifact = ModelArtifact.load(str(tmp_path / "model"))
    assert artifact.training["epochs"] == 6 and artifact.training["last_epoch"]["epoch"] == 5


def test_resources_no_node_has_fail_at_once_instead_of_waiting_forever(tmp_path):
    from anomaly_core.preflight import PreflightError

    data = str(tmp_path / "data")
    generate(data, categories=["capsule"], size=48, n_train=6, n_test_good=1, n_test_defect=1)
    start = time.perf_counter()
    with pytest.raises(PreflightError, match=r"--cpus-per-worker 64: 1 x \{'CPU': 64.0\} cannot be placed"):
        train.main(["--data", data, "--category", "capsule", "--output", str(tmp_path / "model"),
                    "--set", "backbone=resnet18", "--set", "weights=random", "--set", "image_size=48",
                    "--cpus-per-worker", "64"])
    with pytest.raises(PreflightError, match="--use-gpu"):
        train.main(["--data", data, "--category", "capsule", "--output", str(tmp_path / "model"),
                    "--set", "backbone=resnet18", "--set", "weights=random", "--set", "image_size=48",
                    "--use-gpu"])
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "model").exists()


def test_a_set_up_error_in_the_workers_ends_the_run_once_with_its_reason(tmp_path):
    """PaDiM statistics no device could hold: the driver cannot know the workers' memory, the
    workers' set-up finds out; the run ends once (no retries) and the job raises the reason."""
    data = str(tmp_path / "data")
    generate(data, categories=["capsule"], size=48, n_train=6, n_test_good=1, n_test_defect=1)
    storage_path = tmp_path / "ray_results"
    with pytest.raises(ValueError, match="could not start training: .*padim needs"):
        train.main(["--data", data, "--category", "capsule", "--output", str(tmp_path / "model"),
                    "--set", "backbone=resnet18", "--set", "weights=random",
                    "--set", "image_size=4096", "--num-workers", "2", "--max-failures", "3",
                    "--storage-path", str(storage_path)])
    # One attempt: its one checkpoint is the reason, and no worker group was started again.
    reasons = list(storage_path.glob("**/fatal_error.txt"))
    assert len(reasons) == 1 and "padim needs" in reasons[0].read_text()
    assert not (tmp_path / "model" / "model.json").exists()
