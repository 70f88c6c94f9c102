"""What object-store faults cost a nightly score job: rows lost, rows duplicated, S3 calls
retried, runs needed and extra wall time. Prints a table and writes JSON.

Images and results in a bucket of a loopback S3 server (moto) reached through the S3 fault
proxy of the tests (tests/s3_faults.py); every job a fresh `python -m jobs.score` process on
one local Ray, as `ray job submit` runs it. Cases, each into a fresh output prefix:
  none       no fault: the baseline
  throttle   503 SlowDown on --slow-down of the requests and TCP resets on --reset of them
  stall      every request held for --stall seconds once the first rows are published
  budget     everything answered 503 once the first rows are published, with AWS_MAX_ATTEMPTS=2:
             the job stops (exit 4); then the same command again on a healthy store
Then node loss, on two Ray nodes on loopback (tests/e2e/ray_nodes.py: head and worker, 2 CPUs
each, a model actor on each), images and results in a local folder both see:
  nodes      no fault: the baseline on two nodes
  lost       the worker node killed (SIGKILL, every process) at --kill-at of the baseline's time
  replaced   the same, and a new worker node joining 10 s later
  stuck      a model actor stopped (SIGSTOP) at the same point: its batches wait until
             --stall-timeout (20 s) ends the attempt and a new one redoes them

    python -m bench.faults [--images 500] [--size 128] [--stall 30] [--cases store,nodes]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import (
    REPO,
    bench_artifact,
    detector_at_defaults,
    image_set,
    machine,
    module_command,
    print_table,
    set_env,
    write_json,
)
from bench.fleet import RAY, start_ray


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--size", type=int, default=128, help="image side and model input (px)")
    p.add_argument("--slow-down", type=float, default=0.05)
    p.add_argument("--reset", type=float, default=0.03)
    p.add_argument("--stall", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-at", type=float, default=0.4)
    p.add_argument("--cases", default="store,nodes", help="store, nodes or both")
    p.add_argument("--out", default="bench-results/faults.json")
    args = p.parse_args(argv)
    set_env()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    work = tempfile.mkdtemp(prefix="bench-faults-")
    rows = []
    try:
        model = os.path.join(work, "model")
        bench_artifact(detector_at_defaults("padim", "cpu", 32, {
            "backbone": "mobilenet_v2", "image_size": args.size})).save(model)
        if "store" in args.cases:
            rows += store_cases(args, work, model)
        if "nodes" in args.cases:
            rows += node_cases(args, work, model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows, [("case", "fault"), ("runs", "runs"), ("exit_codes", "exits"),
                       ("inputs", "inputs"), ("rows", "rows"), ("lost", "rows lost"),
                       ("duplicated", "duplicated"), ("error_rows", "error rows"),
                       ("faults", "faults injected"), ("retries", "S3 retries"),
                       ("redone", "images redone"), ("wall_s", "wall s"),
                       ("extra_wall_s", "extra s")])
    result = {"machine": machine(), "images": args.images, "size": args.size, "rows": rows}
    write_json(args.out, result)
    return result


def store_cases(args, work: str, model: str) -> list[dict]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    address = start_ray(work)
    try:
        s3 = "http://{}:{}".format(*server.get_host_and_port())
        bucket = upload_images(s3, work, args.images, args.size)
        rows = []
        for case in ("none", "throttle", "stall", "budget"):
            rows.append(run_case(case, args, s3, bucket, model, address))
            rows[-1]["extra_wall_s"] = round(rows[-1]["wall_s"] - rows[0]["wall_s"], 1)
        return rows
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
        server.stop()


def node_cases(args, work: str, model: str) -> list[dict]:
    """The node-loss cases on two loopback nodes; the kill point is a share of the baseline's
    time from the dataset's start."""
    import signal

    from tests.e2e.ray_nodes import LoopbackCluster, run_and_kill

    images = os.path.dirname(image_set(os.path.join(work, "local"), args.images, args.size)[0])
    nodes = LoopbackCluster(REPO, os.path.dirname(sys.executable), cpus=2)
    rows, running = [], None
    try:
        nodes.start_head()
        nodes.add_worker()
        for case in ("nodes", "lost", "replaced", "stuck"):
            out = os.path.join(work, f"out-{case}")
            cmd = module_command("jobs.score", "--model", model, "--input", images, "--output",
                                 out, "--address", nodes.address, "--num-actors", "2",
                                 "--cpus-per-actor", "1.5", "--decode-cpus", "0.25",
                                 "--row-cpus", "0.25", "--batch-size", "8",
                                 "--rows-per-file", "32",
                                 "--stall-timeout", "20", "--progress-every", "5")
            kill_after = None if case == "nodes" else args.kill_at * running
            code, output, events = run_and_kill(
                nodes, cmd, ready=lambda text: "Running Dataset" in text, kill_after=kill_after,
                replace_after=10.0 if case == "replaced" else None, timeout=900,
                fault=(lambda: _signal_an_actor(signal.SIGSTOP)) if case == "stuck" else None)
            if case == "nodes":  # the dataset's running time: the kill point is a share of it
                running = events["ended"] - events["ready"]
            if case == "stuck":
                _signal_an_actor(signal.SIGCONT)
            elif case == "lost":  # the next case starts on two nodes again
                nodes.wait_for_nodes(1)
                nodes.add_worker()
            summary = _success_local(out)
            uris = read_uris(out)
            distinct = len({u for u, _ in uris})
            rows.append({"case": case, "runs": 1, "exit_codes": str(code),
                         "inputs": args.images, "rows": len(uris),
                         "lost": args.images - distinct, "duplicated": len(uris) - distinct,
                         "error_rows": sum(e is not None for _, e in uris), "faults": 0 if
                         case == "nodes" else 1, "retries": 0,
                         "redone": sum(r["images"] for r in summary.get("restarts", [])),
                         "wall_s": round(events["ended"] - events["started"], 1)})
            rows[-1]["extra_wall_s"] = round(rows[-1]["wall_s"] - rows[0]["wall_s"], 1)
    finally:
        nodes.stop()
    return rows


def _signal_an_actor(sig: int) -> float:
    """Send `sig` to the first model actor process found; returns the time."""
    from tests.helpers import pids_named

    for pid in pids_named(b"ScoringActor")[:1]:
        os.kill(pid, sig)
    return time.time()


def _success_local(out: str) -> dict:
    import glob

    found = glob.glob(os.path.join(out, "_runs", "*", "_SUCCESS.json"))
    return json.loads(open(found[0]).read()) if found else {}


def upload_images(s3: str, work: str, n: int, size: int) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    client.create_bucket(Bucket="plant")
    for path in image_set(os.path.join(work, "images"), n, size):
        client.upload_file(path, "plant", f"in/{os.path.basename(path)}")
    return "s3://plant"


def run_case(case: str, args, s3: str, bucket: str, model: str, address: str) -> dict:
    from anomaly_core import storage
    from tests.s3_faults import FaultProxy

    out = f"{bucket}/out-{case}"
    cmd = module_command("jobs.score", "--model", model, "--input", f"{bucket}/in",
                         "--output", out, "--address", address, "--progress-every", "5")
    env = dict(os.environ)
    if case == "budget":
        env["AWS_MAX_ATTEMPTS"] = "2"
    exits, retries = [], 0
    start = time.perf_counter()
    with FaultProxy(s3, seed=args.seed) as proxy:
        env["AWS_ENDPOINT_URL_S3"] = proxy.url
        if case == "throttle":
            proxy.set_faults(slow_down=args.slow_down, reset=args.reset)
        job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        if case in ("stall", "budget"):
            wait_for_rows(out, s3, job)
            if case == "stall":
                proxy.stall(args.stall)
            else:
                proxy.set_faults(slow_down=1.0)
        job.communicate()
        exits.append(job.returncode)
        if case == "budget":
            proxy.set_faults(slow_down=0.0)
            exits.append(subprocess.run(cmd, cwd=REPO, env=env, capture_output=True).returncode)
        wall = time.perf_counter() - start
        faults = proxy.faults["slow_down"] + proxy.faults["reset"] + proxy.faults["stalled"]
    os.environ["AWS_ENDPOINT_URL_S3"] = s3
    try:
        uris = read_uris(out)
        summary = [f for f in storage.list_files(f"{out}/_runs") if f.endswith("_SUCCESS.json")]
        if summary:
            retries = json.loads(storage.read_bytes(summary[0]))["storage_retries"]["total"]
    finally:
        os.environ.pop("AWS_ENDPOINT_URL_S3")
    distinct = len(set(u for u, _ in uris))
    return {"case": case, "runs": len(exits), "exit_codes": ",".join(map(str, exits)),
            "inputs": args.images, "rows": len(uris), "lost": args.images - distinct,
            "duplicated": len(uris) - distinct, "error_rows": sum(e is not None for _, e in uris),
            "faults": faults, "retries": retries, "wall_s": round(wall, 1)}


def wait_for_rows(out: str, s3: str, job: subprocess.Popen, timeout: float = 300) -> None:
    """Until the job has published its first part file (read past the proxy)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    bucket, prefix = out[len("s3://"):].split("/", 1)
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/dt=")
        if listed.get("KeyCount"):
            return
        time.sleep(0.2)


def read_uris(out: str) -> list[tuple[str, str | None]]:
    import pyarrow.dataset as pads

    from anomaly_core import storage

    fs, path = storage.filesystem(out)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(
        columns=["uri", "error"])
    return list(zip(table["uri"].to_pylist(), table["error"].to_pylist()))


if __name__ == "__main__":
    main()
