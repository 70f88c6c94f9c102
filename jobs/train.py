"""Fit a detector with Ray Train on N workers, calibrate it on a validation split, write the artifact.

    python -m jobs.train --data DIR_OR_S3 --category bottle --detector padim --output ARTIFACT_URI
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import yaml

from jobs.common import add_cluster_flags, init_ray, log, parse_overrides, redacted, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MVTec-layout root (with --category) or a folder of normal images; local or s3://")
    p.add_argument("--category", help="MVTec category: train on <data>/<category>/train/good")
    p.add_argument("--output", required=True, help="artifact directory to write (local or s3://)")
    p.add_argument("--detector", default=None, help="registered detector name (default padim, or from --config)")
    p.add_argument("--config", help="YAML file: {detector: NAME, options: {...}, training: {...}}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="detector option, repeatable, e.g. --set backbone=resnet18 --set image_size=128")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of normal training images held out to calibrate the threshold")
    p.add_argument("--val-data", help="MVTec-layout root with labelled <category>/test defects for "
                   "calibration (never the data you evaluate on)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1, help="epochs for gradient detectors")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    p.add_argument("--storage-path", default=None, help="Ray Train run storage (local or s3://)")
    p.add_argument("--seed", type=int, default=0)
    add_cluster_flags(p)
    return p.parse_args(argv)


def detector_options(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Detector name and options from --config, then --detector and --set on top."""
    name, options = "padim", {}
    if args.config:
        with open(args.config) as f:
            spec = yaml.safe_load(f) or {}
        name = spec.get("detector", name)
        options.update(spec.get("options", {}))
    name = args.detector or name
    options.update(parse_overrides(args.overrides))
    return name, options


def training_records(args: argparse.Namespace) -> tuple[list, list]:
    """(train, validation) records: normal images split, plus labelled --val-data if given."""
    from anomaly_core.data.datasets import folder_records, mvtec_records, split_records

    if args.category:
        normal = mvtec_records(args.data, args.category, "train", s3_endpoint=args.s3_endpoint)
    else:
        normal = folder_records(args.data, s3_endpoint=args.s3_endpoint)
        normal = [type(r)(r.uri, label=0, defect="good") for r in normal]
    train, val = split_records(normal, args.val_fraction, seed=args.seed)
    if args.val_data:
        if not args.category:
            raise SystemExit("--val-data needs --category (an MVTec-layout test split)")
        val += mvtec_records(args.val_data, args.category, "test", s3_endpoint=args.s3_endpoint)
    if not train:
        raise SystemExit(f"no training images under {args.data}")
    if not val:
        raise SystemExit("no validation images: raise --val-fraction or pass --val-data")
    return train, val


def train_worker(cfg: dict) -> None:
    """Ray Train worker: fit on this rank's shard; rank 0 calibrates and writes the artifact."""
    import ray.train
    import ray.train.torch

    from anomaly_core.artifact import ModelArtifact, fingerprint
    from anomaly_core.data.datasets import ImageDataset, ImageRecord
    from anomaly_core.detectors import build_detector
    from anomaly_core.evaluate import calibrate, predict
    from anomaly_core.fit import fit

    device = ray.train.torch.get_device()
    detector = build_detector(cfg["detector"], **cfg["options"])
    size = (detector.config.image_size,) * 2
    train = [ImageRecord(**r) for r in cfg["train"]]
    dataset = ImageDataset(train, size, s3_endpoint=cfg["s3_endpoint"])
    metrics = fit(
        detector, dataset, batch_size=cfg["batch_size"], epochs=cfg["epochs"], device=device,
        loader_workers=cfg["loader_workers"], seed=cfg["seed"], report=ray.train.report,
    )
    final: dict[str, Any] = {"done": 1}
    if ray.train.get_context().get_world_rank() == 0:
        val = ImageDataset([ImageRecord(**r) for r in cfg["val"]], size, s3_endpoint=cfg["s3_endpoint"])
        pred = predict(detector, val, batch_size=cfg["batch_size"], device=device)
        calibration, val_metrics = calibrate(pred["scores"], pred["maps"], pred["labels"], pred["masks"])
        artifact = ModelArtifact(
            detector=detector.cpu(),
            calibration=calibration,
            validation_metrics=val_metrics,
            training={
                "images": len(train),
                "validation_images": len(val),
                "fingerprint": fingerprint([r.uri for r in train]),
                "workers": ray.train.get_context().get_world_size(),
                "epochs": cfg["epochs"],
                "last_epoch": metrics,
            },
        )
        artifact.save(cfg["output"], s3_endpoint=cfg["s3_endpoint"])
        final.update(val_metrics, model_version=artifact.model_version, threshold=calibration.threshold)
    ray.train.report(final)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    name, options = detector_options(args)
    from dataclasses import asdict

    from anomaly_core.detectors import make_config

    options = asdict(make_config(name, **options))  # fail on a bad option before any Ray work
    train, val = training_records(args)
    log.info("train %s: %d training, %d validation images; options %s",
             name, len(train), len(val), json.dumps(redacted(options)))
    init_ray(args.address)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = {
        "detector": name, "options": options, "output": args.output, "s3_endpoint": args.s3_endpoint,
        "train": [asdict(r) for r in train], "val": [asdict(r) for r in val],
        "batch_size": args.batch_size, "epochs": args.epochs, "loader_workers": args.loader_workers,
        "seed": args.seed,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(
            num_workers=args.num_workers, use_gpu=args.use_gpu,
            resources_per_worker={"CPU": args.cpus_per_worker},
        ),
        run_config=RunConfig(name=f"train-{name}-{int(time.time())}", storage_path=args.storage_path),
    )
    start = time.perf_counter()
    result = trainer.fit()
    summary = {"detector": name, "artifact": args.output, "workers": args.num_workers,
               "train_images": len(train), "validation_images": len(val),
               "wall_s": round(time.perf_counter() - start, 1), **(result.metrics or {})}
    summary.pop("done", None)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
