"""Artifact load memory: peak resident memory of a fresh process that loads a large PaDiM
artifact and scores a few images, against the weights file's size. Prints a table.

    python -m bench.artifact_load [--size 4.96] [--dir DIR] [--keep]

The artifact is PaDiM on wide_resnet50_2 (random backbone weights) at 256 px with its fitted
statistics set to random values of the fitted shape: mean [4096, d], inv_covariance
[4096, d, d], d = 550 (the paper's setting, a 4.96 GB file) or fewer to reach `--size` GB.
Creating it, loading it, and building the detector alone (the baseline) each run in their own
fresh process; peak RSS is that process's VmHWM, which counts the mapped weights' page-cache
pages once touched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

from bench.common import bench_artifact, last_json, proc_status_bytes, run_fresh

POSITIONS = 64 * 64  # wide_resnet50_2's layer1 grid at 256 px
PAPER_FEATURES = 550
GB = 1e9


def n_features(size_gb: float) -> int:
    """Channels d whose statistics (4096 x (d + d^2) float32) come closest to `size_gb`."""
    d = int(math.sqrt(size_gb * GB / (4 * POSITIONS)))
    return max(1, min(PAPER_FEATURES, d))


def create(path: str, d: int) -> dict:
    """Write the artifact; this process's memory is not what is measured."""
    import torch

    from anomaly_core.detectors import build_detector

    torch.manual_seed(0)
    detector = build_detector("padim", weights="random", image_size=256, n_features=d)
    assert detector.grid[0] * detector.grid[1] == POSITIONS
    gen = torch.Generator().manual_seed(0)
    detector.mean = torch.empty(POSITIONS, d).normal_(0, 1, generator=gen)
    detector.inv_covariance = torch.empty(POSITIONS, d, d).normal_(0, 1e-3, generator=gen)
    start = time.perf_counter()
    bench_artifact(detector).save(path)
    return {"save_s": time.perf_counter() - start}


def measure(path: str, mode: str, images: int) -> dict:
    """Load (or only build) and score twice in this fresh process; its own peak memory."""
    import torch

    from anomaly_core.detectors import build_detector
    from anomaly_core.model.artifact import ModelArtifact
    from anomaly_core.model.info import ArtifactInfo

    info = ArtifactInfo.read(path)
    batch = torch.rand(images, 3, *info.input_size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    if mode == "build":
        build_detector(info.name, **dict(info.config, weights="random"))
        return {"load_s": time.perf_counter() - start, "peak": proc_status_bytes("VmHWM")}
    artifact = ModelArtifact.load(path)
    load_s = time.perf_counter() - start
    times = []
    for _ in range(2):  # the first call also faults the mapped weights in from the page cache
        start = time.perf_counter()
        out = artifact.predict(batch)
        times.append(time.perf_counter() - start)
    assert torch.isfinite(out.score).all()
    return {
        "load_s": load_s,
        "predict_s": times,
        "peak": proc_status_bytes("VmHWM"),
        "rss_file": proc_status_bytes("RssFile"),
        "rss_anon": proc_status_bytes("RssAnon"),
    }


def run_child(*args: str) -> dict:
    """One step in a fresh process (`--child`): its JSON."""
    out = run_fresh("bench.artifact_load", "--child", *args)
    if out.returncode != 0:
        sys.exit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return last_json(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=float, default=4.96,
                   help="target weights size in GB (4.96: the paper's 550 channels, the most)")
    p.add_argument("--images", type=int, default=2, help="images scored after the load")
    p.add_argument("--dir", help="where to write the artifact (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the artifact afterwards")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, path, *rest = args.child
        result = create(path, int(rest[0])) if kind == "create" else measure(path, kind, args.images)
        print(json.dumps(result))
        return

    root = args.dir or tempfile.mkdtemp(prefix="artifact-load-")
    path = os.path.join(root, "padim-large")
    d = n_features(args.size)
    try:
        made = run_child("create", path, str(d))
        size = os.path.getsize(os.path.join(path, "weights.safetensors"))
        rows = [("build only (imports, detector, no weights)", run_child("build", path))]
        rows.append(("ModelArtifact.load (mmap)", run_child("load", path)))
    finally:
        if not args.keep:
            shutil.rmtree(root if not args.dir else path, ignore_errors=True)
    print(f"PaDiM wide_resnet50_2 256 px, d={d}: weights file {size / GB:.2f} GB "
          f"(saved in {made['save_s']:.1f} s), {args.images} images scored")
    print("| path | weights GB | peak RSS GB | peak / file | load s | predict s (1st, 2nd) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        predict = ", ".join(f"{t:.1f}" for t in r["predict_s"]) if "predict_s" in r else "-"
        print(f"| {name} | {size / GB:.2f} | {r['peak'] / GB:.2f} | {r['peak'] / size:.2f} | "
              f"{r['load_s']:.1f} | {predict} |")


if __name__ == "__main__":
    main()
