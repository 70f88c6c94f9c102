"""Start and stop Ray nodes of the e2e tests with `ray start`, touching no other Ray on the machine."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import defaultdict


def synthetic_bucket(s3_endpoint: str, folder: str, prefix: str, category: str, **sizes: int) -> str:
    """A new bucket on the S3 server holding a synthetic MVTec tree under data/; its s3:// URI."""
    import uuid
    from pathlib import Path

    import boto3

    from anomaly_core import storage
    from anomaly_core.data.synthetic import generate

    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    generate(folder, categories=[category], **sizes)
    for path in storage.list_files(folder):
        storage.write_bytes(f"s3://{bucket}/data/{os.path.relpath(path, folder)}",
                            Path(path).read_bytes())
    return f"s3://{bucket}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int, str, str]]:
    """pid -> (ppid, session id, state, command line) of every process /proc lets us read."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        table[int(name)] = (int(fields[1]), int(fields[3]), fields[0], cmdline)
    return table


def node_pids(session: int, temp_dir: str | None) -> set[int]:
    """The live processes of this head: `ray start`'s session (GCS, raylet, dashboard, client
    server, workers), anything naming its temp dir, and all their descendants (job drivers run
    in sessions of their own under a worker). Without `temp_dir`: a worker node's processes."""
    table = _processes()
    children = defaultdict(list)
    for pid, (ppid, *_) in table.items():
        children[ppid].append(pid)
    # "ray" in the command line: a process that merely reuses the old `ray start` pid as its
    # session id is not ours (every Ray process names ray: its binary, module or ray:: title).
    todo = [pid for pid, (_, sid, _, cmd) in table.items()
            if (sid == session and "ray" in cmd) or (temp_dir and temp_dir in cmd)]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children[pid])
    mine, pid = set(), os.getpid()
    while pid in table and pid not in mine:  # never this process or its ancestors
        mine.add(pid)
        pid = table[pid][0]
    return {p for p in found - mine if table[p][2] != "Z"}


def stop_node(session: int, temp_dir: str) -> set[int]:
    """`ray stop --force` for this head only: SIGKILL its processes; returns any that survive."""
    left: set[int] = set()
    for _ in range(3):
        pids = node_pids(session, temp_dir)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline:
            time.sleep(0.2)
            pids = node_pids(session, temp_dir)
        left = pids
        if not left:
            break
    return left


class LoopbackCluster:
    """A Ray head on 127.0.0.2 and worker nodes on 127.0.0.3, ... started with `ray start`, each
    with `cpus` CPUs; a worker node can be killed as a preempted machine vanishes (SIGKILL to
    every process of it) and another one added. Node deaths are noticed within a few seconds
    (GCS health checks every 0.5 s)."""

    def __init__(self, repo: str, bin_dir: str, cpus: int = 2, env: dict | None = None) -> None:
        import tempfile

        self.repo, self.cpus = repo, cpus
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # Multi-node needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, which maps 127.0.0.1 to the
        # machine's outward address; the nodes take 127.0.0.2, 127.0.0.3, ... instead: still
        # loopback only.
        self.env.update(PATH=f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}", PYTHONPATH=repo,
                        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_AUTH_MODE="disabled",
                        RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", ANOMALY_OFFLINE="1",
                        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
                        RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000",
                        RAY_health_check_failure_threshold="4", **(env or {}))
        self.temp_dir = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")
        self.gcs_port = free_port()
        self.address = f"127.0.0.2:{self.gcs_port}"
        self.head = None
        self.workers: list = []  # Popen of each worker node's `ray start --block`, in order
        self.ips: dict[int, str] = {}  # each worker's node address, by its Popen's pid
        self.next_ip = 3

    def _common(self) -> list[str]:
        return [f"--num-cpus={self.cpus}", "--object-store-memory=400000000",
                "--disable-usage-stats"]

    def start_head(self) -> None:
        import subprocess

        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs
        # to free a dead trial's reserved CPUs (without it a sweep after a lost node hung).
        cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.2", f"--port={self.gcs_port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.2",
               f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
               f"--temp-dir={self.temp_dir}", *self._common()]
        self.head = subprocess.Popen(cmd, cwd=self.repo, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        output, _ = self.head.communicate(timeout=120)
        assert self.head.returncode == 0, f"ray start --head failed:\n{output}"

    def worker_command(self) -> list[str]:
        ip = self.last_ip = f"127.0.0.{self.next_ip}"
        self.next_ip += 1
        return ["ray", "start", f"--address={self.address}", f"--node-ip-address={ip}",
                *self._common(), "--block",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def add_worker(self, command: list[str] | None = None, wait: float = 90):
        """Start a worker node (`command`: worker_command(), possibly wrapped); wait until the
        cluster has one more live node."""
        import subprocess

        before = self.alive_nodes()
        proc = subprocess.Popen(command or self.worker_command(), cwd=self.repo, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.workers.append(proc)
        self.ips[proc.pid] = self.last_ip
        self.wait_for_nodes(before + 1, wait)
        return proc

    def drain_worker(self, deadline_s: int, proc=None) -> float:
        """Drain a worker node (the newest by default) as a cloud preemption handler does
        (`ray drain-node`, reason preemption, with a deadline); returns the time."""
        import subprocess

        ip = self.ips[(proc or self.workers[-1]).pid]
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print('node id:', *[n['NodeID'] for n in ray.nodes() "
                 "if n['Alive'] and n['NodeManagerAddress'] == sys.argv[2]])")
        out = subprocess.run(["python", "-c", probe, self.address, ip], env=self.env,
                             capture_output=True, text=True, timeout=60)
        node = next(line.split()[-1] for line in out.stdout.splitlines()
                    if line.startswith("node id: "))
        subprocess.run(["ray", "drain-node", f"--address={self.address}", f"--node-id={node}",
                        "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=spot reclaim",
                        f"--deadline-remaining-seconds={deadline_s}"], env=self.env,
                       check=True, capture_output=True, timeout=60)
        return time.time()

    def kill_worker(self, proc=None) -> float:
        """SIGKILL every process of a worker node (the newest by default), as when its machine is
        preempted; returns the time it was killed."""
        proc = proc or self.workers[-1]
        killed = time.time()
        for pid in node_pids(proc.pid, None):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)
        return killed

    def alive_nodes(self) -> int:
        import subprocess

        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print('alive nodes:', sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run(["python", "-c", probe, self.address], env=self.env,
                             capture_output=True, text=True, timeout=60)
        found = [line for line in out.stdout.splitlines() if line.startswith("alive nodes: ")]
        return int(found[-1].split()[-1]) if found else 0

    def wait_for_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() != n:
            assert time.time() < deadline, f"the cluster never had {n} live nodes"
            time.sleep(1)

    def stop(self) -> set[int]:
        """Every node down; returns the pids that survived SIGKILL."""
        import shutil

        left: set[int] = set()
        for proc in [*self.workers, self.head]:
            if proc is None:
                continue
            if proc.poll() is None:
                proc.kill()
            left |= stop_node(proc.pid, self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def run_and_kill(nodes: LoopbackCluster, cmd: list[str], *, ready=None,
                 kill_after: float | None = None, replace_after: float | None = None,
                 fault=None, timeout: float = 480) -> tuple[int, str, dict]:
    """Run a job's driver `cmd` against `nodes` (as `ray job submit` runs one). Once
    `ready(output so far)` holds, with kill_after: wait that many seconds and kill the worker
    node (or call `fault()` instead); with replace_after, another worker node joins that many
    seconds later. Returns the exit code, the output and when things happened (started, ready,
    killed, replaced, ended: time.time())."""
    import subprocess
    import threading

    events = {"started": time.time()}
    job = subprocess.Popen(cmd, cwd=nodes.repo, env=nodes.env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)
    reader.start()
    try:
        if ready is not None:
            deadline = time.time() + timeout
            while not ready("".join(output)):
                assert job.poll() is None and time.time() < deadline, (
                    "the job ended or timed out before the point to kill at:\n"
                    + "".join(output)[-4000:])
                time.sleep(0.1)
            events["ready"] = time.time()
        if kill_after is not None:
            time.sleep(kill_after)
            events["killed"] = (fault or nodes.kill_worker)()
            if replace_after is not None:
                time.sleep(replace_after)
                nodes.add_worker()
                events["replaced"] = time.time()
        job.wait(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
        reader.join(timeout=10)
    events["ended"] = time.time()
    return job.returncode, "".join(output), events
