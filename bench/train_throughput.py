"""Training throughput per worker: images/s of each detector's training step (gradient family) or
observe step (memory family) in one process, all in one run. Prints a table.

    python -m bench.train_throughput [--image-size 128] [--batch-size 16] [--steps 6] [--threads 1]

One thread by default: a Ray Train worker with --cpus-per-worker 1 gets one core. Backbones use
random weights: the cost does not depend on the weights' values.

    python -m bench.train_throughput --input-pipelines [--detector stpm] [--images 256]
        [--source-size 512] [--workers 1] [--epochs 2] [--use-gpu]

runs jobs.train on the same image files with each input pipeline (each worker's own DataLoader,
or Ray Data decode tasks streaming uint8 shards) and prints rank 0's training images/s in the
last epoch and the job's wall time.

    python -m bench.train_throughput --layouts [--threads 2] [--rounds 5] [--steps 2]
        [--device cuda] [--precision bf16] [--detector stpm] [--out layouts.json]

times the gradient-family detectors' training steps in NCHW and in channels_last (jobs.train
--channels-last) alternately, and prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.common import (
    TRAIN_CASES,
    backbone_text,
    image_set,
    machine,
    options_text,
    print_table,
    set_env,
    synchronizer,
    write_json,
)


def make_step(name: str, options: dict, size: int, batch: int, *, device: str = "cpu",
              channels_last: bool = False, precision: str = "fp32"):
    """One training step (observe() for the memory family) of a fresh detector at its defaults
    plus `options`, on one fixed batch, laid out and autocast as anomaly_core.training.fit does."""
    import torch

    from anomaly_core.detectors import build_detector
    from anomaly_core.training.fit import autocast

    torch.manual_seed(0)  # the same weights and batch for every layout
    detector = build_detector(name, image_size=size, weights="random", **options).to(device)
    images = torch.rand(batch, 3, size, size, device=device)
    if channels_last:
        detector.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if detector.family == "memory":
        detector.eval()
        return lambda: detector.observe(images)
    detector.train()
    optimizers = detector.optimizers()
    where = torch.device(device)

    def step() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with autocast(where, precision):
            loss = detector.training_step(images)
        loss.float().backward()
        for opt in optimizers:
            opt.step()
    return step


def measure(name: str, options: dict, size: int, batch: int, steps: int) -> float:
    """images/s over `steps` timed steps after one warm-up step."""
    step = make_step(name, options, size, batch)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def layouts(args: argparse.Namespace) -> list[dict]:
    """Training steps of the gradient-family detectors in NCHW and channels_last (jobs.train
    --channels-last), timed alternately in `args.rounds` rounds of `args.steps` steps each, so
    both layouts see the same machine. One row per case with both rates and their ratio."""
    from anomaly_core.detectors import detector_class

    sync = synchronizer(args.device)
    rows = []
    for name, options in TRAIN_CASES:
        if detector_class(name).family == "memory" or (args.detector and name != args.detector):
            continue  # the memory family runs no gradient steps
        steps = {cl: make_step(name, options, args.image_size, args.batch_size,
                               device=args.device, channels_last=cl, precision=args.precision)
                 for cl in (False, True)}
        spent = dict.fromkeys(steps, 0.0)
        for step in steps.values():
            step()  # warm-up (and the allocator's first growth)
        for _ in range(args.rounds):
            for cl, step in steps.items():
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                spent[cl] += time.perf_counter() - start
        done = args.rounds * args.steps * args.batch_size
        row = {"detector": name, "options": options_text(options), "nchw": done / spent[False],
               "channels_last": done / spent[True]}
        row["channels_last_x"] = row["channels_last"] / row["nchw"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ntraining images/s at {args.image_size} px, batch {args.batch_size}, "
          f"{args.precision}, on {args.device}, {args.rounds} alternating rounds of "
          f"{args.steps} steps per layout")
    print_table(rows, [("detector", "detector"), ("options", "options"), ("nchw", "NCHW"),
                       ("channels_last", "channels_last"), ("channels_last_x", "x")])
    return rows


def input_pipelines(args: argparse.Namespace) -> list[dict]:
    """jobs.train with each --input-pipeline on the same files; one row each."""
    import tempfile

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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--input-pipelines", action="store_true",
                   help="compare jobs.train's input pipelines instead (see above)")
    p.add_argument("--layouts", action="store_true",
                   help="NCHW against channels_last training steps, alternated (see above)")
    p.add_argument("--rounds", type=int, default=5, help="alternations of --layouts")
    p.add_argument("--device", default="cpu", help="device of --layouts")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="autocast of --layouts' steps (jobs.train --precision)")
    p.add_argument("--out", help="JSON of --layouts")
    p.add_argument("--detector", default=None,
                   help="one detector (--input-pipelines: default stpm; --layouts: default all)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--source-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    args = p.parse_args(argv)
    if args.input_pipelines:
        args.detector = args.detector or "stpm"
        return {"rows": input_pipelines(args)}
    if args.layouts:
        import torch

        torch.set_num_threads(args.threads if args.device == "cpu" else torch.get_num_threads())
        result = {"machine": machine(), "args": vars(args), "rows": layouts(args)}
        if args.out:
            write_json(args.out, result)
        return result
    import torch

    torch.set_num_threads(args.threads)
    print(f"{'detector':<14}{'options':<26}{'backbone':<18}{'images/s':>10}")
    for name, options in TRAIN_CASES:
        rate = measure(name, options, args.image_size, args.batch_size, args.steps)
        print(f"{name:<14}{options_text(options):<26}{backbone_text(name, options):<18}"
              f"{rate:>10.1f}", flush=True)
    return {}


if __name__ == "__main__":
    main()
