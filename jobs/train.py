"""Fit a detector with Ray Train on N workers, calibrate it on a validation split, write the artifact.

    python -m jobs.train --data DIR_OR_S3 --category bottle --detector padim --output ARTIFACT_URI
"""

from __future__ import annotations

import argparse
import json
import time

from anomaly_core.config import TrainingConfig
from jobs.common import log, redacted, run_job, setup_logging, use_storage_flags
from jobs.preflight import preflight_training
from jobs.trainer import (
    TrainerSettings,
    detector_options,
    make_trainer,
    train_parser,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return train_parser(__doc__.split("\n")[0]).parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    use_storage_flags(args)
    name, options = detector_options(args)
    from dataclasses import asdict

    from anomaly_core import storage
    from anomaly_core.detectors import make_config

    options = asdict(make_config(name, **options))  # fail on a bad option before any Ray work
    product = None
    if args.register:  # the registry must be reachable before any work
        from anomaly_core.model import registry

        product = registry.check_product(args.product or product_name(args))
        registry.client()
    # Checkpoints go beside the artifact unless told otherwise: never a node's own disk.
    args.storage_path = args.storage_path or storage.join(args.output, "checkpoints")
    train, val = preflight_training(args, name, options, args.output)
    log.info("train %s: %d training, %d validation images; options %s",
             name, len(train), len(val), json.dumps(redacted(options)))
    config = TrainingConfig.from_args(args, name, options, train, val, args.output)
    trainer = make_trainer(TrainerSettings.from_args(args), config)
    start = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    fatal = (result.metrics or {}).get("fatal_error")
    if fatal:  # a set-up error every attempt would repeat: not retried, reported as bad input
        raise ValueError(f"the workers could not start training: {fatal}")
    # model.json is the record of what was trained (Ray keeps only checkpointed metrics).
    from anomaly_core.model.info import read_metadata  # model.json only, without torch

    meta = read_metadata(args.output)
    summary = {"detector": name, "artifact": args.output, "model_version": meta["model_version"],
               "workers": args.num_workers, "train_images": len(train), "validation_images": len(val),
               "wall_s": round(time.perf_counter() - start, 1),
               "threshold": meta["calibration"]["threshold"], "calibration": meta["calibration"]["method"],
               "pixel_threshold": meta["calibration"]["pixel_threshold"],
               "pixel_calibration": meta["calibration"].get("pixel_method", ""),
               **{k: meta["training"].get(k) for k in ("best_epoch", "resumed_from_epoch", "nodes")},
               # rank 0's training throughput in its last epoch, and how its images arrived
               "input_pipeline": args.input_pipeline,
               "worker_images_per_s": (meta["training"].get("last_epoch") or {}).get("images_per_s"),
               "validation_metrics": meta["validation_metrics"]}
    body = json.dumps(summary, indent=2, default=str)
    storage.write_bytes(storage.join(args.output, "train_summary.json"), body.encode())
    if product:
        summary["registered"] = register(args, product, name, options, meta, summary)
        body = json.dumps(summary, indent=2, default=str)
    print(body)
    return summary


def product_name(args: argparse.Namespace) -> str:
    """--category, else the last part of --data."""
    return args.category or args.data.rstrip("/").rsplit("/", 1)[-1]


def register(args, product: str, detector: str, options: dict, meta: dict, summary: dict) -> dict:
    """An MLflow run of this fit and a new registered version of `product` pointing at the
    artifact (by an absolute URI: scoring may run anywhere)."""
    import os

    from anomaly_core import storage
    from anomaly_core.model import registry

    source = args.output if storage.is_s3(args.output) else os.path.abspath(args.output)
    validation = meta["validation_metrics"]
    training = {k: getattr(args, k) for k in (
        "data", "category", "val_fraction", "val_data", "objective", "num_workers", "batch_size",
        "epochs", "precision", "input_pipeline", "seed", "tile", "tiled_size", "tile_stride")}
    version = registry.log_training(
        product, source=source, detector=detector, params={**options, **training},
        metrics={f"val_{k}" if not k.startswith("val_") else k: v
                 for k, v in validation.items()},
        history=meta["training"].get("history", []), summary=summary,
        tags={"model_version": meta["model_version"],
              "fingerprint": meta["training"]["fingerprint"],
              **{f"val_{k}": f"{v:.4f}" for k, v in validation.items()
                 if k in ("image_auroc", "pixel_auroc") and isinstance(v, float)}})
    log.info("registered %s version %d (%s) in %s", product, version.version,
             ",".join(version.aliases) or "no alias", registry.shown_uri())
    return {"product": product, "version": version.version, "aliases": list(version.aliases),
            "run_id": version.run_id}


if __name__ == "__main__":
    run_job(main)
