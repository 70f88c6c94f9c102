"""Training throughput per worker: images/s of each detector's training step (gradient family) or
observe step (memory family) in one process, all in one run. Prints a table.

    python bench/train_throughput.py [--image-size 128] [--batch-size 16] [--steps 6] [--threads 1]

One thread by default: a Ray Train worker with --cpus-per-worker 1 gets one core. Backbones use
random weights: the cost does not depend on the weights' values.

    python bench/train_throughput.py --input-pipelines [--detector stpm] [--images 256]
        [--source-size 512] [--workers 1] [--epochs 2] [--use-gpu]

runs jobs.train on the same image files with each input pipeline (each worker's own DataLoader,
or Ray Data decode tasks streaming uint8 shards) and prints rank 0's training images/s in the
last epoch and the job's wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(name: str, options: dict, size: int, batch: int, steps: int) -> float:
    """images/s over `steps` timed steps after one warm-up step."""
    import torch

    from anomaly_core.detectors import build_detector

    torch.manual_seed(0)
    detector = build_detector(name, image_size=size, weights="random", **options)
    images = torch.rand(batch, 3, size, size)
    if detector.family == "memory":
        detector.eval()
        step = lambda: detector.observe(images)  # noqa: E731
    else:
        detector.train()
        optimizers = detector.optimizers()

        def step() -> None:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            detector.training_step(images).backward()
            for opt in optimizers:
                opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


CASES = [
    ("autoencoder", {}),
    ("autoencoder", {"transfer_learning": True}),
    ("fastflow", {}),
    ("fastflow", {"train_backbone": False}),
    ("stpm", {}),
    ("simplenet", {}),
    ("padim", {}),
    ("patchcore", {}),
]


def input_pipelines(args: argparse.Namespace) -> list[dict]:
    """jobs.train with each --input-pipeline on the same files; one row each."""
    import tempfile

    from bench.common import image_set, set_env
    from jobs import train
    from jobs.common import init_ray

    set_env()
    work = tempfile.mkdtemp(prefix="bench-train-input-")
    paths = image_set(os.path.join(work, "data"), args.images, args.source_size)
    init_ray(None)
    rows = []
    for pipeline in ("loader", "ray-data"):
        start = time.perf_counter()
        summary = train.main([
            "--data", os.path.dirname(paths[0]), "--output", os.path.join(work, pipeline),
            "--detector", args.detector, "--set", "weights=random", "--set",
            f"image_size={args.image_size}", "--batch-size", str(args.batch_size), "--epochs",
            str(args.epochs), "--num-workers", str(args.workers), "--input-pipeline", pipeline,
            "--val-fraction", "0.1", *(["--use-gpu"] if args.use_gpu else [])])
        rows.append({"pipeline": pipeline, "worker_images_per_s": summary["worker_images_per_s"],
                     "wall_s": time.perf_counter() - start})
    print(f"\n{args.detector} at {args.image_size} px from {args.images} {args.source_size} px "
          f"PNGs, {args.workers} worker(s), batch {args.batch_size}, {args.epochs} epochs")
    print(f"{'input pipeline':<16}{'rank 0 images/s (last epoch)':>30}{'job wall s':>12}")
    for r in rows:
        print(f"{r['pipeline']:<16}{r['worker_images_per_s']:>30.1f}{r['wall_s']:>12.1f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--input-pipelines", action="store_true",
                   help="compare jobs.train's input pipelines instead (see above)")
    p.add_argument("--detector", default="stpm")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--source-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args()
    if args.input_pipelines:
        input_pipelines(args)
        return
    import torch

    from anomaly_core.detectors import make_config

    torch.set_num_threads(args.threads)
    print(f"{'detector':<14}{'options':<26}{'backbone':<18}{'images/s':>10}")
    for name, options in CASES:
        rate = measure(name, options, args.image_size, args.batch_size, args.steps)
        config = make_config(name, **options)
        backbone = "-" if name == "autoencoder" and not config.transfer_learning else config.backbone
        shown = ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        print(f"{name:<14}{shown:<26}{backbone:<18}{rate:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
