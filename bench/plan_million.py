"""The scoring job's planning and first-row latency at a million inputs from a manifest.

Makes N image files (hard links to a few distinct synthetic PNGs, so a million files cost a
million directory entries, not a million images of disk), writes a Parquet manifest of their
URIs, and starts `python -m jobs.score --manifest ...` on a local Ray (started here, as a
cluster's would be). Measured from the job's own log and output: planning (manifest read,
input list frozen, pending computed: the job's "plan" log line), the input blocks handed to
Ray Data, the first part file published in the partition (from the job's start), and the
driver's peak RSS until then; then the job is stopped (scoring a million images is not the
point).

    python -m bench.plan_million [--inputs 1000000] [--out F]
    python -m bench.plan_million --smoke      # 2,000 inputs (CI)
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
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
    proc_status_bytes,
    set_env,
    write_json,
)


def make_inputs(work: str, n: int, per_folder: int = 10_000) -> str:
    """n image files as hard links to 20 distinct ones; returns the manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    distinct = image_set(os.path.join(work, "distinct"), 20, 96, distinct=20)
    uris = []
    for i in range(n):
        folder = os.path.join(work, "images", f"{i // per_folder:04d}")
        if i % per_folder == 0:
            os.makedirs(folder)
        uri = os.path.join(folder, f"{i:07d}.png")
        os.link(distinct[i % len(distinct)], uri)
        uris.append(uri)
    manifest = os.path.join(work, "manifest.parquet")
    pq.write_table(pa.table({"uri": uris}), manifest)
    return manifest


def peak_rss_mb(pid: int) -> float:
    peak = proc_status_bytes("VmHWM", pid)
    return float("nan") if peak is None else peak / 2**20


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the first rows")
    p.add_argument("--job-args", default="", help="more jobs.score flags, space separated")
    p.add_argument("--smoke", action="store_true", help="2,000 inputs (CI)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "plan_million.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.inputs = 2000
    set_env()
    import ray

    work = tempfile.mkdtemp(prefix="bench-plan-")
    start = time.perf_counter()
    manifest = make_inputs(work, args.inputs)
    made_s = time.perf_counter() - start
    model = os.path.join(work, "model")
    detector = detector_at_defaults("padim", "cpu", 4, {"backbone": "resnet18", "image_size": 64})
    bench_artifact(detector).save(model)
    del detector

    ray.init(include_dashboard=False, num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1")
    out = os.path.join(work, "scores")
    cmd = module_command("jobs.score", "--model", model, "--manifest", manifest,
                         "--output", out, "--batch-size", "16", "--rows-per-file", "16",
                         "--address", ray.get_runtime_context().gcs_address,
                         *args.job_args.split())
    log_path = os.path.join(work, "job.log")
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    first_rows = peak = None
    try:
        while time.perf_counter() - started < args.timeout and proc.poll() is None:
            peak = peak_rss_mb(proc.pid)
            if glob.glob(os.path.join(out, "dt=*", "product=*", "version=*", "part-*.parquet")):
                first_rows = time.perf_counter() - started
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        ray.shutdown()
    text = open(log_path).read()
    plan = re.search(r"planned in ([\d.]+) s", text)
    row = {"inputs": args.inputs, "plan_s": float(plan.group(1)) if plan else None,
           "blocks": int(m.group(1)) if (m := re.search(r"in (\d+) blocks", text)) else None,
           "first_rows_s": first_rows,
           "driver_peak_mb": peak}
    if first_rows is None:
        print(text[-3000:])
    print(f"\n{args.inputs:,} inputs from a Parquet manifest ({made_s:.0f} s to make the files), "
          f"{os.cpu_count()} CPUs; first rows from the job's start (process start, Ray connect, "
          "plan, actor start)")
    print_table([row], [("inputs", "inputs"), ("plan_s", "plan s"), ("blocks", "blocks"),
                        ("first_rows_s", "first rows s"), ("driver_peak_mb", "driver peak MB")])
    result = {"machine": machine(), "args": vars(args), "result": row}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
