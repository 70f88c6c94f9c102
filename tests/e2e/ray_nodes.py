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


def node_pids(session: int, temp_dir: str) -> set[int]:
    """The live processes of this head: `ray start`'s session (GCS, raylet, dashboard, client
    server, workers), anything naming its temp dir, and all their descendants (job drivers run
    in sessions of their own under a worker)."""
    table = _processes()
    children = defaultdict(list)
    for pid, (ppid, *_) in table.items():
        children[ppid].append(pid)
    # "ray" in the command line: a process that merely reuses the old `ray start` pid as its
    # session id is not ours (every Ray process names ray: its binary, module or ray:: title).
    todo = [pid for pid, (_, sid, _, cmd) in table.items()
            if (sid == session and "ray" in cmd) or temp_dir in cmd]
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
