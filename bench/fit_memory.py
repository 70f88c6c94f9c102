"""Fit memory of the memory detectors. Each configuration runs in a fresh process; prints a table.

PatchCore (default): peak RSS and fit time against the number of training images, for our
streaming fit (bounded budget) and the usual all-in-memory one (every patch held, one coreset at
the end), side by side in one run.
PaDiM: peak RSS against the size of its statistics (a mean and a d x d sum per feature-map
position, in accumulate_dtype) at several image sizes, at the paper's defaults.

    python -m bench.fit_memory [--images 100,1000,5000] [--image-size 64] [--budget-mb 64]
    python -m bench.fit_memory --detector padim [--sizes 128,224,256] [--images 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from bench.common import last_json, proc_status_bytes, run_fresh

MODES = {"streaming": "ours: streaming, bounded", "all-in-memory": "all patches, one coreset"}
DEFAULTS = {  # per detector: --images, --backbone, --batch-size
    "patchcore": ("100,1000,5000", "resnet18", 32),
    "padim": ("32", "wide_resnet50_2", 8),
}
GB = 1e9


def run_child(*args: str) -> dict:
    """One measurement in a fresh process (`--child`): the JSON its last output line holds."""
    return last_json(run_fresh("bench.fit_memory", "--child", *args, check=True).stdout)


def reset_peak() -> None:
    """Make VmHWM the current RSS, so the next read is the peak of what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def padim_child(args: argparse.Namespace) -> None:
    """One PaDiM fit (and one scoring batch) in this fresh process; prints JSON."""
    import torch

    from anomaly_core.detectors import build_detector
    from anomaly_core.training.fit import fit

    class Images(torch.utils.data.Dataset):
        # Random images: the statistics' size and the work do not depend on the pixels.
        def __init__(self, n: int, size: int) -> None:
            self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int) -> dict:
            return {"image": self.images[i]}

    torch.manual_seed(0)
    detector = build_detector(
        "padim", backbone=args.backbone, weights=args.weights, image_size=args.image_size
    )
    stats = detector.fit_state_bytes(detector.config)
    data = Images(args.n, args.image_size)
    reset_peak()
    before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    fit(detector, data, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM")
    after = proc_status_bytes("VmRSS")
    reset_peak()
    start = time.perf_counter()
    detector(data.images[: args.batch_size])
    score_s = time.perf_counter() - start
    positions, d = detector.mean.shape
    print(
        json.dumps(
            {
                "positions": positions,
                "d": d,
                "stats_bytes": stats,
                "rss_before": before,
                "peak_rss": peak,
                "rss_after": after,
                "score_peak_rss": proc_status_bytes("VmHWM"),
                "fit_s": seconds,
                "score_s": score_s,
            }
        )
    )


def padim_main(args: argparse.Namespace) -> None:
    """Each image size in a fresh process; a table of peak RSS against the statistics' size."""
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        result = run_child(
            "--detector", "padim", "--n", args.images, "--image-size", str(size),
            "--backbone", args.backbone, "--weights", args.weights,
            "--batch-size", str(args.batch_size),
        )
        rows.append((size, result))
        print(f"  {size} px: {result}", file=sys.stderr, flush=True)
    print(
        f"\nPaDiM fit ({args.backbone}, {args.weights} weights, other options at their defaults), "
        f"{args.images} images, batch {args.batch_size}, {os.cpu_count()} cores; GB = 1e9 bytes"
    )
    print(
        f"{'px':>4} {'positions':>9} {'d':>4} {'stats GB':>9} {'RSS before':>11} {'peak RSS':>9}"
        f" {'peak-stats':>11} {'growth-stats':>13} {'fit s':>7} {'score peak':>11} {'score s':>8}"
    )
    for size, r in rows:
        stats = r["stats_bytes"]
        print(
            f"{size:>4} {r['positions']:>9} {r['d']:>4} {stats / GB:>9.2f}"
            f" {r['rss_before'] / GB:>11.2f}"
            f" {r['peak_rss'] / GB:>9.2f} {(r['peak_rss'] - stats) / GB:>11.2f}"
            f" {(r['peak_rss'] - r['rss_before'] - stats) / GB:>13.2f} {r['fit_s']:>7.1f}"
            f" {r['score_peak_rss'] / GB:>11.2f} {r['score_s']:>8.1f}"
        )


def child(args: argparse.Namespace) -> None:
    """One fit in this (fresh) process; prints its measurements as JSON."""
    import torch

    from anomaly_core.data.datasets import ImageDataset, mvtec_records
    from anomaly_core.detectors import build_detector
    from anomaly_core.training.fit import fit

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
    before = proc_status_bytes("VmRSS") / 2**20
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
    p.add_argument("--detector", choices=list(DEFAULTS), default="patchcore")
    p.add_argument(
        "--images",
        help="training set sizes, comma-separated (patchcore: 100,1000,5000); padim: one (32)",
    )
    p.add_argument("--image-size", type=int, default=64, help="patchcore's input size")
    p.add_argument("--sizes", default="128,224,256", help="padim's input sizes, comma-separated")
    p.add_argument(
        "--budget-mb", type=float, default=64, help="memory_budget_gb of the streaming fit, in MB"
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=0.01,
        help="coreset ratio (0.01 keeps the exact greedy affordable on CPU)",
    )
    p.add_argument("--backbone", help="patchcore: resnet18, padim: wide_resnet50_2")
    p.add_argument(
        "--weights", default="random", help="memory and time do not depend on the weights' values"
    )
    p.add_argument("--batch-size", type=int, help="patchcore: 32, padim: 8")
    p.add_argument("--data", help="existing synthetic data root (made if absent)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    images, backbone, batch_size = DEFAULTS[args.detector]
    args.images = args.images or images
    args.backbone = args.backbone or backbone
    args.batch_size = args.batch_size or batch_size
    if args.child:
        (padim_child if args.detector == "padim" else child)(args)
        return
    if args.detector == "padim":
        padim_main(args)
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
            result = run_child(
                "--mode", mode, "--n", str(n), "--data", data,
                "--image-size", str(args.image_size), "--budget-mb", str(args.budget_mb),
                "--ratio", str(args.ratio), "--backbone", args.backbone,
                "--weights", args.weights, "--batch-size", str(args.batch_size),
            )
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
