"""Chaos: two Ray nodes on loopback; the worker node is killed (every process of it, SIGKILL, as
when a spot machine is taken back) at a seeded random point of a scoring run, a training and a
sweep. Each job must finish by itself, exit 0, and leave every input exactly once (DuckDB counts
over the published Parquet) with the scores an undisturbed model gives.

Object-store faults (503 SlowDown, resets, stalls) are in tests/integration/test_score_job.py
and test_store_faults.py, through the S3 fault proxy of tests/s3_faults.py.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.ray_nodes import LoopbackCluster, run_and_kill

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SIZE = 64
SEED = int(os.environ.get("CHAOS_SEED", "27"))

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kills its nodes through /proc"),
]


@pytest.fixture(scope="module")
def nodes() -> Iterator[LoopbackCluster]:
    """A head and a worker node of 2 CPUs each; a test that kills the worker adds another."""
    import ray

    if ray.is_initialized():
        pytest.skip("an in-process Ray is running; this test needs the machine's only Ray")
    cluster = LoopbackCluster(str(REPO), str(VENV_BIN), cpus=2)
    try:
        cluster.start_head()
        cluster.add_worker()
        yield cluster
    finally:
        assert not cluster.stop(), "Ray processes survived SIGKILL"


@pytest.fixture(scope="module")
def scoring_set(tmp_path_factory) -> tuple[str, str]:
    """160 synthetic images and a PaDiM artifact (random mobilenet_v2: the scores are compared
    with the same model's, not with the labels)."""
    from bench.common import bench_artifact, detector_at_defaults, image_set

    folder = tmp_path_factory.mktemp("chaos-score")
    image_set(str(folder / "in"), 160, SIZE, distinct=24)
    model = str(folder / "model")
    bench_artifact(detector_at_defaults("padim", "cpu", 16, {
        "backbone": "mobilenet_v2", "image_size": SIZE})).save(model)
    return str(folder / "in" / "images"), model


def score_command(nodes: LoopbackCluster, images: str, model: str, out: str) -> list[str]:
    """`python -m jobs.score` on the cluster: a batch per 4 images and a part file per 8 rows;
    a model actor on each node (1.5 of its 2 CPUs)."""
    return [sys.executable, "-m", "jobs.score", "--model", model, "--input", images,
            "--output", out, "--address", nodes.address, "--num-actors", "2",
            "--cpus-per-actor", "1.5", "--decode-cpus", "0.25", "--row-cpus", "0.25",
            "--batch-size", "4", "--stall-timeout", "20", "--rows-per-file", "8",
            "--progress-every", "2"]


def assert_exactly_once(out: str, images: str, model: str) -> list[dict]:
    """DuckDB over the published files: one row per input, no error, no duplicate, nothing left
    in staging; the scores are the model's own on those images."""
    import duckdb

    from anomaly_core.data.decode import read_image
    from anomaly_core.model.artifact import ModelArtifact
    from anomaly_core.scoring.scorer import Scorer

    inputs = sorted(str(p) for p in Path(images).iterdir())
    glob = f"{out}/dt=*/product=*/version=*/*.parquet"
    rows, distinct, errors = duckdb.sql(
        f"select count(*), count(distinct uri), count(error) from read_parquet('{glob}', "
        "hive_partitioning = true)").fetchall()[0]
    assert (rows, distinct, errors) == (len(inputs), len(inputs), 0)
    assert not list(Path(out).glob("_runs/*/staging/**/*.parquet")), "orphan staged part files"
    table = duckdb.sql(f"select uri, score from read_parquet('{glob}') order by uri").fetchall()
    assert [u for u, _ in table] == inputs
    # The model's scores of a sample, undisturbed, in this process.
    artifact = ModelArtifact.load(model)
    sample = random.Random(SEED).sample(range(len(inputs)), 16)
    batch = np.stack([read_image(inputs[i], (SIZE, SIZE))["image"] for i in sample])
    expected = Scorer(artifact, device="cpu")(batch).score.numpy()
    got = np.array([table[i][1] for i in sample])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    return [json.loads(p.read_text()) for p in Path(out).glob("_runs/*/_SUCCESS.json")]


@pytest.mark.parametrize("replace_after", [None, 8.0], ids=["no-replacement", "replacement"])
def test_scoring_finishes_exactly_once_when_the_worker_node_is_lost(
        nodes, scoring_set, tmp_path, replace_after):
    images, model = scoring_set
    kill_after = random.Random(f"{SEED}-{replace_after}").uniform(1.0, 4.0)
    out = str(tmp_path / "scores")
    # The worker node is killed that many seconds after the dataset started running (while
    # the model actors hold batches); with replace_after another one joins that much later.
    code, output, _ = run_and_kill(nodes, score_command(nodes, images, model, out),
                                   ready=lambda text: "Running Dataset" in text,
                                   kill_after=kill_after, replace_after=replace_after)
    if replace_after is None:  # the next test starts on two nodes again
        nodes.wait_for_nodes(1)
        nodes.add_worker()
    assert code == 0, output[-6000:]
    (summary,) = assert_exactly_once(out, images, model)
    assert summary["rows"] == len(os.listdir(images))
    assert len(summary["nodes_lost"]) == 1, summary
    assert "node(s) lost" in output  # in the progress lines


def test_scoring_hands_a_drained_node_no_new_batches_and_finishes_exactly_once(
        nodes, scoring_set, tmp_path):
    """The worker node gets a preemption notice (`ray drain-node`, 10 s deadline) at a seeded
    point, and is killed at its deadline, as a cloud does: the job says so, sends it no new
    batches, and every image ends up with exactly one row, without a new attempt."""
    images, model = scoring_set
    out = str(tmp_path / "scores")
    fault = {}

    def drain_then_kill() -> float:
        fault["drained"] = nodes.drain_worker(10)
        threading.Timer(10, lambda: fault.update(killed=nodes.kill_worker())).start()
        return fault["drained"]

    code, output, _ = run_and_kill(
        nodes, score_command(nodes, images, model, out),
        ready=lambda text: "Running Dataset" in text,
        kill_after=random.Random(f"{SEED}-drain").uniform(1.0, 4.0), fault=drain_then_kill)
    while "killed" not in fault:
        time.sleep(0.5)
    nodes.wait_for_nodes(1)  # the next test starts on two nodes again
    nodes.add_worker()
    assert code == 0, output[-6000:]
    (summary,) = assert_exactly_once(out, images, model)
    assert len(summary["nodes_drained"]) == 1 and summary["restarts"] == [], summary
    assert "is being drained (deadline in" in output


@pytest.fixture(scope="module")
def training_set(tmp_path_factory) -> str:
    from anomaly_core.data.synthetic import generate

    folder = str(tmp_path_factory.mktemp("chaos-train"))
    generate(folder, categories=["capsule"], size=SIZE, n_train=16, n_test_good=4,
             n_test_defect=4)
    return folder


def checkpointed(folder: Path, runs: int = 1) -> bool:
    """Ray Train registered a checkpoint of `runs` runs under `folder` (a run's controller
    writes its snapshot then; a checkpoint folder appears before it is registered)."""
    return len(list(folder.glob("**/checkpoint_manager_snapshot.json"))) >= runs


def train(nodes: LoopbackCluster, data: str, out: Path, *, kill: bool) -> dict:
    """`python -m jobs.train` of the autoencoder on two workers, one per node (2 CPUs each),
    Ray Train's checkpoints under `out`. With kill, the worker node is killed at a seeded
    random moment after the first checkpoint is registered, and a replacement joins 5 s later
    (Ray Train restarts the worker group once there is room for it)."""
    results = out / "ray_results"
    cmd = [sys.executable, "-m", "jobs.train", "--data", data, "--category", "capsule",
           "--output", str(out / "model"), "--detector", "autoencoder", "--set",
           f"image_size={SIZE}", "--epochs", "6", "--batch-size", "4", "--num-workers", "2",
           "--cpus-per-worker", "2", "--storage-path", str(results), "--address", nodes.address]
    code, output, _ = run_and_kill(
        nodes, cmd, ready=lambda _: checkpointed(results),
        kill_after=random.Random(SEED).uniform(0.0, 1.0) if kill else None, replace_after=5.0)
    assert code == 0, output[-6000:]
    if kill:  # the job said what happened, and what happens next
        assert "lost" in output and "last epoch's checkpoint" in output
    return json.loads((out / "model" / "train_summary.json").read_text())


def test_training_resumes_from_its_checkpoint_when_the_worker_node_is_lost(
        nodes, training_set, tmp_path):
    from anomaly_core.data.datasets import mvtec_records
    from anomaly_core.data.decode import read_image
    from anomaly_core.model.artifact import ModelArtifact
    from anomaly_core.scoring.scorer import Scorer

    whole = train(nodes, training_set, tmp_path / "whole", kill=False)
    resumed = train(nodes, training_set, tmp_path / "resumed", kill=True)
    assert whole["resumed_from_epoch"] is None
    assert resumed["resumed_from_epoch"] is not None and resumed["resumed_from_epoch"] >= 0
    # The resumed fit drew what the whole one drew (seeds per rank and epoch): its scores of
    # the test images are the same but for the order of floating-point sums.
    images = [r.uri for r in mvtec_records(training_set, "capsule", "test")]
    batch = np.stack([read_image(u, (SIZE, SIZE))["image"] for u in images])
    scores = [Scorer(ModelArtifact.load(str(tmp_path / run / "model")), device="cpu")(batch)
              .score.numpy() for run in ("whole", "resumed")]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-3)


def test_sweep_accounts_for_every_trial_when_the_worker_node_is_lost(nodes, training_set,
                                                                      tmp_path):
    """Two autoencoder trials at once, one training worker each (1.5 CPUs, beside the trials'
    own 0.01: one per node); the worker node is killed once a checkpoint is registered and a
    replacement joins 5 s later. Every trial finishes, and none reports an epoch twice."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "jobs.tune", "--data", training_set, "--category", "capsule",
           "--detector", "autoencoder", "--set", f"image_size={SIZE}", "--param",
           "lr=grid:0.001,0.003", "--search", "grid", "--epochs", "6", "--batch-size", "4",
           "--num-workers", "1", "--cpus-per-worker", "1.5", "--max-concurrent", "2",
           "--output", str(out), "--address", nodes.address]
    # Once a trial has a registered checkpoint (a trial killed before its first one starts
    # over, as it must). Waiting for both let a busy machine finish the sweep before the kill.
    code, output, _ = run_and_kill(nodes, cmd, ready=lambda _: checkpointed(out, 1),
                                   kill_after=random.Random(SEED).uniform(0.0, 1.0),
                                   replace_after=5.0)
    assert code == 0, output[-6000:]
    assert "lost" in output and "resumes from its last checkpoint" in output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["trials"], summary["finished"]) == (2, 2), summary
    results = list(out.glob("tune/sweep-autoencoder/*/result.json"))
    assert len(results) == 2
    for path in results:  # what a trial reported, one JSON per line: no epoch twice
        epochs = [json.loads(line)["epoch"] for line in path.read_text().splitlines()]
        assert epochs == sorted(set(epochs)), (path, epochs)
