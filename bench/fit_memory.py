"""PatchCore fit memory: peak RSS and fit time against the number of training images, for our
streaming fit (bounded budget) and the usual all-in-memory one (every patch held, one coreset at
the end), side by side in one run. Each configuration runs in a fresh process. Prints a table.

    python bench/fit_memory.py [--images 100,1000,5000] [--image-size 64] [--budget-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = {"streaming": "ours: streaming, bounded", "all-in-memory": "all patches, one coreset"}


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    """One fit in this (fresh) process; prints its measurements as JSON."""
    import torch

    from anomaly_core.data.datasets import ImageDataset, mvtec_records
    from anomaly_core.detectors import build_detector
    from anomaly_core.fit import fit

    torch.manual_seed(0)
    budget = args.budget_mb * 2**20 / 2**30 if args.mode == "streaming" else None
    detector = build_detector(
        "patchcore",
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        coreset_ratio=args.ratio,
        memory_budget_gb=budget,
    )
    records = mvtec_records(args.data, "capsule", "train")[: args.n]
    dataset = ImageDataset(records, (args.image_size, args.image_size))
    before = rss_mb()
    start = time.perf_counter()
    fit(detector, dataset, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    stats = detector.fit_stats
    print(
        json.dumps(
            {
                "rss_before_mb": before,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "fit_s": seconds,
                "patches": stats["rows_seen"],
                "bank_rows": stats["bank_rows"],
                "tracked_peak_mb": stats["peak_bytes"] / 2**20,
                "capped": stats["capped"],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default="100,1000,5000", help="training set sizes, comma-separated")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--budget-mb", type=float, default=64, help="memory_budget_gb of the streaming fit, in MB"
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=0.01,
        help="coreset ratio (0.01 keeps the exact greedy affordable on CPU)",
    )
    p.add_argument("--backbone", default="resnet18")
    p.add_argument(
        "--weights", default="random", help="memory and time do not depend on the weights' values"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data", help="existing synthetic data root (made if absent)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    sizes = [int(n) for n in args.images.split(",")]
    data = args.data or os.path.join(tempfile.mkdtemp(prefix="bench_fit_memory_"), "data")
    if not os.path.isdir(os.path.join(data, "capsule", "train")):
        from anomaly_core.data.synthetic import generate

        generate(
            data,
            categories=["capsule"],
            size=args.image_size,
            n_train=max(sizes),
            n_test_good=0,
            n_test_defect=0,
        )
    rows = []
    for n in sizes:
        for mode in MODES:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                "--mode",
                mode,
                "--n",
                str(n),
                "--data",
                data,
                "--image-size",
                str(args.image_size),
                "--budget-mb",
                str(args.budget_mb),
                "--ratio",
                str(args.ratio),
                "--backbone",
                args.backbone,
                "--weights",
                args.weights,
                "--batch-size",
                str(args.batch_size),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append((n, mode, result))
            print(f"  {n} images, {mode}: {result}", file=sys.stderr, flush=True)
    print(
        f"\nPatchCore fit, {args.backbone} ({args.weights} weights) at {args.image_size} px, "
        f"coreset ratio {args.ratio}, streaming budget {args.budget_mb:g} MB, {os.cpu_count()} cores"
    )
    head = f"{'images':>7} {'patches':>9} {'fit':<26}{'peak RSS MB':>12}{'fit growth MB':>14}{'tracked MB':>11}{'bank':>7}{'fit s':>8}"
    print(head)
    for n, mode, r in rows:
        growth = r["peak_rss_mb"] - r["rss_before_mb"]
        print(
            f"{n:>7} {r['patches']:>9} {MODES[mode]:<26}{r['peak_rss_mb']:>12.0f}{growth:>14.0f}"
            f"{r['tracked_peak_mb']:>11.1f}{r['bank_rows']:>7}{r['fit_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
