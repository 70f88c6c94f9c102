"""Two Ray nodes on loopback (`ray start --head` and `ray start --address`), S3 on loopback: every job
spreads over both nodes and every output is read back from S3; a local path one node does not
see stops a job before any work.

The second node runs in a mount namespace of its own in which SHADOWED is an empty tmpfs: a
folder the driver sees and that node does not, as a node-local disk would be on a real cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.ray_nodes import LoopbackCluster, synthetic_bucket

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CATEGORY = "capsule"
SIZE = 48
TINY = ["--set", "backbone=mobilenet_v2", "--set", f"image_size={SIZE}"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops its nodes through /proc"),
]


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True)
    return probe.returncode == 0


@dataclass
class Cluster:
    address: str  # GCS address for ray.init / --address
    s3_endpoint: str
    bucket: str
    data: str  # s3:// MVTec root
    shadowed: str  # a local folder the worker node cannot see


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str, tmp_path_factory) -> Iterator[Cluster]:
    """A head and a worker node, each with 2 CPUs, the worker in its own mount namespace."""
    import ray


    if ray.is_initialized():
        pytest.skip("an in-process Ray is running; this test needs the machine's only Ray")
    bucket = synthetic_bucket(s3_endpoint, str(tmp_path_factory.mktemp("mn-data")), "mn", CATEGORY,
                              size=SIZE, n_train=12, n_test_good=3, n_test_defect=3)
    shadowed = tempfile.mkdtemp(prefix="mn-shadow-", dir="/tmp")
    nodes = LoopbackCluster(str(REPO), str(VENV_BIN), cpus=2)
    try:
        nodes.start_head()
        worker = nodes.worker_command()
        if _can_unshare():
            # The worker node sees an empty tmpfs where the driver sees `shadowed`.
            script = f"mount -t tmpfs tmpfs {shadowed} && exec {' '.join(worker)}"
            worker = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        nodes.add_worker(worker)
        # The driver joins as a client of the head's node; the jobs' init_ray then finds it.
        ray.init(address=nodes.address, _node_ip_address="127.0.0.2", log_to_driver=False)
        yield Cluster(nodes.address, s3_endpoint, bucket, f"{bucket}/data", shadowed)
    finally:
        ray.shutdown()
        left = nodes.stop()
        shutil.rmtree(shadowed, ignore_errors=True)
        assert not left, f"Ray processes survived SIGKILL: {sorted(left)}"


@pytest.fixture(scope="module")
def padim_model(cluster: Cluster) -> tuple[dict, str]:
    from jobs import train

    model = f"{cluster.bucket}/models/padim"
    summary = train.main(["--data", cluster.data, "--category", CATEGORY, "--detector", "padim",
                          *TINY, "--output", model, "--num-workers", "2", "--cpus-per-worker", "2",
                          "--address", cluster.address, "--s3-endpoint", cluster.s3_endpoint])
    return summary, model


def test_memory_detector_trains_with_one_worker_on_each_node(cluster, padim_model):
    from anomaly_core.model.info import read_metadata
    from anomaly_core.storage import read_bytes

    summary, model = padim_model
    meta = read_metadata(model)
    assert meta["training"]["workers"] == 2
    assert len(meta["training"]["nodes"]) == 2  # 2 CPUs per worker: one worker per node
    assert summary["model_version"] == meta["model_version"]
    on_s3 = json.loads(read_bytes(f"{model}/train_summary.json"))
    assert on_s3["model_version"] == meta["model_version"]


def test_scoring_runs_actors_and_tasks_on_both_nodes(cluster, padim_model):
    import pyarrow.dataset as pads

    from anomaly_core import storage
    from jobs import score

    _, model = padim_model
    source, out = f"{cluster.data}/{CATEGORY}/test/", f"{cluster.bucket}/scores"
    summary = score.main(["--model", model, "--input", source, "--output", out,
                          "--num-actors", "2", "--cpus-per-actor", "1.5", "--decode-cpus", "0.25",
                          # a batch per image: enough batches that the actor on the blocks'
                          # own node (Ray prefers it) cannot hold them all at once
                          "--batch-size", "1", "--rows-per-file", "4", "--progress-every", "0",
                          "--address", cluster.address, "--s3-endpoint", cluster.s3_endpoint])
    assert len(summary["nodes"]["model"]) == 2  # 1.5 CPUs per actor: one actor per node
    assert summary["nodes"]["rows"]  # the row tasks ran (and wrote to S3) wherever there was room
    images = storage.list_files(source)
    fs, path = storage.filesystem(out)
    rows = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(images)
    assert all(r["error"] is None and r["mask_png"] for r in rows)


def test_a_local_path_one_node_does_not_see_stops_the_job_before_any_work(cluster):
    from anomaly_core.preflight import PreflightError
    from jobs import score

    if not _can_unshare():
        pytest.skip("no mount namespaces here: every local path is visible from both nodes")
    out = os.path.join(cluster.shadowed, "scores")
    source = f"{cluster.data}/{CATEGORY}/test/"
    model = f"{cluster.bucket}/models/padim"
    with pytest.raises(PreflightError) as err:
        score.main(["--model", model, "--input", source, "--output", out,
                    "--address", cluster.address, "--s3-endpoint", cluster.s3_endpoint])
    assert cluster.shadowed in str(err.value) and "on node 127.0.0.3" in str(err.value)
    assert "shared" in str(err.value)
