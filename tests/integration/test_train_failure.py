"""jobs/train.py survives a worker killed mid-run: Ray Train restarts it from the last checkpoint."""

import os
import signal
import threading
import time

import pytest

from anomaly_core.artifact import ModelArtifact
from anomaly_core.data.synthetic import generate
from jobs import train

pytestmark = pytest.mark.usefixtures("ray_cluster")


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers (Ray titles them after the actor class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"RayTrainWorker" in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


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
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_a_registered_checkpoint, daemon=True)
    killer.start()
    summary = train.main([
        "--data", data, "--category", "capsule", "--output", str(tmp_path / "model"),
        "--detector", "autoencoder", "--set", "image_size=64", "--epochs", "10",
        "--batch-size", "4", "--num-workers", "2", "--storage-path", str(results),
        "--max-failures", "2",
    ])
    killer.join(timeout=1)
    assert killed, "no worker was killed: the run ended before a checkpoint was registered"
    assert summary["resumed_from_epoch"] >= 0  # restarted from a checkpoint, not from scratch
    artifact = ModelArtifact.load(str(tmp_path / "model"))
    assert artifact.training["epochs"] == 10 and artifact.training["last_epoch"]["epoch"] == 9
