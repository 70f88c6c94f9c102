"""Training throughput per worker: images/s of each detector's training step (gradient family) or
observe step (memory family) in one process, all in one run. Prints a table.

    python bench/train_throughput.py [--image-size 128] [--batch-size 16] [--steps 6] [--threads 1]

One thread by default: a Ray Train worker with --cpus-per-worker 1 gets one core. Backbones use
random weights: the cost does not depend on the weights' values.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
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
