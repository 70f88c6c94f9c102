"""End to end on a real Ray head, driven only through Ray's CLI, as the README documents ("Try the cluster path on one machine").

`ray start --head` on 127.0.0.1 (its own --temp-dir and free ports, so it never meets the
in-process Ray of the integration tests or another Ray on the machine), a moto S3 server on
loopback, a synthetic dataset uploaded to it, then `ray job submit --working-dir .` for a
train job and for one job that must fail. (Scoring and training across two nodes are in
test_multi_node.py; sweeps with S3 storage in tests/integration/test_tune.py.) Each job is checked through the
CLI's exit code, `ray job status` and `ray job logs`; the results are read back from S3.

The head is stopped afterwards whatever happens, by killing exactly its processes (those of the
session `ray start` ran in, those naming its temp dir, and their descendants). Not with
`ray stop`: that kills every Ray process on the machine, the in-process cluster of the other
tests and any other user's included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.ray_nodes import free_port, stop_node, synthetic_bucket

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's bin, with `ray` in it
CATEGORY = "capsule"
SIZE = 48
JOB_TIMEOUT = 300

# The runtime env of `ray job submit` on a local head: cluster/runtime_env.yaml without `pip:`
# (the venv the head runs in has every dependency) and without `working_dir` (the flag).
RUNTIME_ENV = {
    "excludes": [".git/", ".venv/", "dist/", "demo_output/", "test-artifacts/", "runs/", "tests/", "bench/",
                 "*.egg-info/", ".pytest_cache/", ".ruff_cache/", ".benchmarks/"],
    "env_vars": {"ANOMALY_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                 "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"},
}
TINY = ["--set", "backbone=mobilenet_v2", "--set", f"image_size={SIZE}"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,  # 1.5 to 3 minutes on 2 cores, depending on what else runs
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stops its Ray head through /proc"),
]


@dataclass
class Head:
    address: str  # the job API: http://127.0.0.1:<dashboard port>
    env: dict[str, str]
    s3_endpoint: str
    bucket: str  # s3://<name>

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], cwd=REPO, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


@dataclass
class Job:
    submission_id: str
    returncode: int  # of `ray job submit`
    output: str  # what `ray job submit` printed
    status: str  # `ray job status` output
    logs: str  # `ray job logs` output
    wall_s: float  # of `ray job submit`

    def describe(self) -> str:
        return (f"job {self.submission_id}: submit exit {self.returncode} after {self.wall_s:.0f} s"
                f"\n--- status\n{self.status}"
                f"\n--- logs (tail)\n{self.logs[-6000:]}\n--- submit output (tail)\n{self.output[-3000:]}")


def submit(head: Head, job: str, *job_args: str) -> Job:
    """`ray job submit` as the docs show it, waiting for the end; then its status and logs."""
    submission_id = f"e2e-{job}-{uuid.uuid4().hex[:8]}"
    cmd = ["job", "submit", "--address", head.address, "--submission-id", submission_id,
           "--working-dir", ".", "--runtime-env-json", json.dumps(RUNTIME_ENV),
           "--", "python", "-m", f"jobs.{job}", *job_args]
    start = time.perf_counter()
    try:
        proc = head.ray(*cmd, timeout=JOB_TIMEOUT)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        head.ray("job", "stop", "--address", head.address, submission_id)
        returncode, output = -1, f"timed out after {JOB_TIMEOUT}s: {exc.stdout!r}"
    wall_s = time.perf_counter() - start
    status = head.ray("job", "status", "--address", head.address, submission_id)
    logs = head.ray("job", "logs", "--address", head.address, submission_id)
    print(f"{submission_id}: `ray job submit` {wall_s:.1f} s, status and logs "
          f"{time.perf_counter() - start - wall_s:.1f} s")
    return Job(submission_id, returncode, output, status.stdout + status.stderr, logs.stdout, wall_s)


def state(job: Job) -> str:
    """SUCCEEDED, FAILED, STOPPED, ... from `ray job status`'s words for them."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", job.status)
    for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                            (r"Job '[^']+' was stopped", "STOPPED")):
        if re.search(pattern, text):
            return status
    found = re.findall(r"Status for job '[^']+': (\w+)", text)
    return found[-1] if found else "UNKNOWN"


def last_json(text: str) -> dict:
    """The last top-level JSON object a job printed (train's summary)."""
    starts = [m.start() for m in re.finditer(r"^\{$", text, re.MULTILINE)]
    assert starts, "no JSON summary in the logs"
    return json.JSONDecoder().raw_decode(text[starts[-1]:])[0]


@pytest.fixture(scope="module")
def head(s3_endpoint: str, tmp_path_factory) -> Iterator[Head]:
    """A Ray head started with `ray start --head` on loopback, stopped (only it) afterwards."""


    if not (VENV_BIN / "ray").exists():
        pytest.fail(f"no `ray` CLI next to {sys.executable}")
    data = tmp_path_factory.mktemp("e2e-data")
    bucket = synthetic_bucket(s3_endpoint, str(data), "e2e", CATEGORY, size=SIZE, n_train=10,
                              n_test_good=2, n_test_defect=1)

    # The nodes' environment: the venv first on PATH, loopback only, no usage report, no hub,
    # and S3 credentials from the environment (the s3_endpoint fixture put fake ones there).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", ANOMALY_OFFLINE="1",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25")
    # Short: Ray's Unix sockets live under it and must stay below 108 characters.
    temp_dir = tempfile.mkdtemp(prefix="rje-", dir="/tmp")
    gcs_port, dashboard_port = free_port(), free_port()
    start = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--num-cpus=4",
             "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    # Its own session, so that its processes can be found and stopped without touching others.
    proc = subprocess.Popen(start, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard_port}", env, s3_endpoint, bucket)
    try:
        t0 = time.perf_counter()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start failed:\n{out}"
        print(f"`ray start --head` {time.perf_counter() - t0:.1f} s")
        deadline = time.time() + 60
        while True:
            listed = head.ray("job", "list", "--address", head.address)
            if listed.returncode == 0:
                break
            assert time.time() < deadline, f"the job API never answered:\n{listed.stderr}"
            time.sleep(1)
        yield head
    finally:
        if proc.poll() is None:
            proc.kill()
        left = stop_node(proc.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray head processes survived SIGKILL: {sorted(left)}"


@pytest.fixture(scope="module")
def trained(head: Head) -> tuple[Job, str]:
    model = f"{head.bucket}/models/{CATEGORY}-padim"
    job = submit(head, "train", "--data", f"{head.bucket}/data", "--category", CATEGORY,
                 "--detector", "padim", *TINY, "--output", model, "--num-workers", "2",
                 "--s3-endpoint", head.s3_endpoint)
    return job, model


def test_train_job_succeeds_and_writes_the_artifact_to_s3(trained, head):
    from anomaly_core.model.info import read_metadata

    job, model = trained
    assert job.returncode == 0 and state(job) == "SUCCEEDED", job.describe()
    summary = last_json(job.logs)
    meta = read_metadata(model)
    assert summary["artifact"] == model and summary["model_version"] == meta["model_version"]
    assert summary["workers"] == 2 and meta["training"]["workers"] == 2
    assert summary["train_images"] + summary["validation_images"] == 10


def test_a_job_that_cannot_load_its_model_fails_with_the_reason_last(head):
    missing = f"{head.bucket}/models/no-such-model"
    job = submit(head, "score", "--model", missing, "--input", f"{head.bucket}/data/{CATEGORY}/test/",
                 "--output", f"{head.bucket}/scores-never", "--s3-endpoint", head.s3_endpoint)
    assert job.returncode == 1 and state(job) == "FAILED", job.describe()
    assert "exit code 2" in job.status, job.describe()
    last = [line for line in job.logs.splitlines() if line.strip()][-1]
    assert "failed:" in last and f"{missing}/model.json" in last, job.describe()
    assert "Traceback" not in job.logs, job.describe()
