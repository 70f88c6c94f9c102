"""Fit a detector with Ray Train on N workers, calibrate it on a validation split, write the artifact.

    python -m jobs.train --data DIR_OR_S3 --category bottle --detector padim --output ARTIFACT_URI
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

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

    candidates = None
    if name == "auto":  # each candidate's options are checked in candidate_config
        from anomaly_core.training.auto import parse_candidates

        candidates = parse_candidates(args.auto_candidates)
    else:
        options = asdict(make_config(name, **options))  # a bad option fails before any Ray work
    if args.register:  # the registry must be reachable before any work
        from anomaly_core.model import registry

        registry.client()
    if args.categories:  # a plant: every product in one job (jobs/fleet.py)
        from jobs import fleet

        return fleet.train_fleet(args, name, options, candidates)
    product = registry.check_product(args.product or product_name(args)) if args.register else None
    # Checkpoints go beside the artifact unless told otherwise: never a node's own disk.
    args.storage_path = args.storage_path or storage.join(args.output, "checkpoints")
    first = candidate_config(args, candidates[0], options, args.output) if candidates else None
    train, val = preflight_training(args, first[0] if first else name,
                                    first[1] if first else options, args.output)
    auto = {}
    if candidates:  # every candidate fits (one after another); the best objective is kept
        fits = []
        for c in candidates:
            det, opts, out = candidate_config(args, c, options, args.output)
            config = TrainingConfig.from_args(args, det, opts, train, val, out)
            start = time.perf_counter()
            fit_with_ray_train(replace(TrainerSettings.from_args(args),
                                       storage_path=storage.join(out, "checkpoints")), config)
            fits.append((config, summarize(args, config, time.perf_counter() - start)))
        config, summary, auto = keep_best(candidates, fits)
    else:
        log.info("train %s: %d training, %d validation images; options %s",
                 name, len(train), len(val), json.dumps(redacted(options)))
        config = TrainingConfig.from_args(args, name, options, train, val, args.output)
        start = time.perf_counter()
        fit_with_ray_train(TrainerSettings.from_args(args), config)
        summary = summarize(args, config, time.perf_counter() - start)
    if product:
        summary["registered"] = register(args, product, config, summary, auto=auto)
        write_summary(config.output, summary)
    print(json.dumps(summary, indent=2, default=str))
    return summary


def keep_best(candidates: list, fits: list[tuple[TrainingConfig, dict]]) -> tuple:
    """--detector auto: the (config, summary) of the candidate with the best objective, and
    what the run records of the choice (`auto_pick`, every candidate's objective), which the
    summary gets too."""
    from anomaly_core.training.auto import objective, pick

    scored = [(c, objective(s["validation_metrics"])) for c, (_, s) in zip(candidates, fits)]
    best = pick(scored)
    config, summary = fits[candidates.index(best)]
    auto = {"auto_pick": best.label, "auto_candidates": {c.label: v for c, v in scored}}
    summary.update(auto)
    log.info("--detector auto picked %s of %s", best.label, auto["auto_candidates"])
    return config, summary, auto


def candidate_config(args, candidate, options: dict, output: str) -> tuple[str, dict, str]:
    """(detector, full options, artifact folder) of one --detector auto candidate: --set options
    the candidate's detector has, then its own settings; its artifact in <output>/<label>."""
    from dataclasses import asdict, fields

    from anomaly_core import storage
    from anomaly_core.detectors import detector_class, make_config

    known = {f.name for f in fields(detector_class(candidate.detector).Config)}
    chosen = {**{k: v for k, v in options.items() if k in known}, **dict(candidate.options)}
    return (candidate.detector, asdict(make_config(candidate.detector, **chosen)),
            storage.join(output, candidate.label))


def fit_with_ray_train(settings: TrainerSettings, config: TrainingConfig) -> None:
    """One Ray Train run of `config`; a set-up error every attempt would repeat is not retried
    and raises as bad input."""
    from anomaly_core.detectors import detector_class
    from jobs.nodes import NodeWatch

    if detector_class(config.detector).family == "memory":
        then = ("Ray Train restarts the workers once there is room for all of them, and this "
                "memory detector's single pass starts over (it has no checkpoint within it)")
    else:
        then = ("Ray Train restarts the workers once there is room for all of them and resumes "
                "from the last epoch's checkpoint")
    with NodeWatch(lambda: f"up to {settings.max_failures} worker failures survived", then=then,
                   what=f"training {config.detector}"):
        result = make_trainer(settings, config).fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    fatal = (result.metrics or {}).get("fatal_error")
    if fatal:
        raise ValueError(f"the workers could not start training: {fatal}")


def summarize(args, config: TrainingConfig, wall_s: float) -> dict:
    """The training summary, from model.json (the record of what was trained: Ray keeps only
    checkpointed metrics), also written beside the artifact as train_summary.json."""
    from anomaly_core.model.info import read_metadata  # model.json only, without torch

    meta = read_metadata(config.output)
    training, calibration = meta["training"], meta["calibration"]
    summary = {"detector": config.detector, "artifact": config.output,
               "model_version": meta["model_version"], "workers": args.num_workers,
               "train_images": len(config.train), "validation_images": len(config.val),
               "wall_s": round(wall_s, 1), "threshold": calibration["threshold"],
               "calibration": calibration["method"],
               "pixel_threshold": calibration["pixel_threshold"],
               "pixel_calibration": calibration.get("pixel_method", ""),
               **{k: training.get(k) for k in ("best_epoch", "resumed_from_epoch", "nodes")},
               # rank 0's training throughput in its last epoch, and how its images arrived
               "input_pipeline": args.input_pipeline,
               "worker_images_per_s": (training.get("last_epoch") or {}).get("images_per_s"),
               "validation_metrics": meta["validation_metrics"],
               "fingerprint": training["fingerprint"]}
    write_summary(config.output, summary)
    return summary


def write_summary(output: str, summary: dict) -> None:
    """train_summary.json beside the artifact."""
    from anomaly_core import storage

    storage.write_bytes(storage.join(output, "train_summary.json"),
                        json.dumps(summary, indent=2, default=str).encode())


def fingerprinted(args, detector: str, options: dict) -> tuple[str, dict, dict]:
    """(detector, options, flags) as a rerun compares them: --detector auto's candidates and
    --set options, not the pick."""
    if args.detector == "auto":
        return "auto", {"candidates": args.auto_candidates, "set": args.overrides}, vars(args)
    return detector, options, vars(args)


def product_name(args: argparse.Namespace) -> str:
    """--category, else the last part of --data."""
    return args.category or args.data.rstrip("/").rsplit("/", 1)[-1]


def register(args, product: str, config: TrainingConfig, summary: dict,
             data_fingerprint: str | None = None, auto: dict | None = None) -> dict:
    """An MLflow run of this fit and a new registered version of `product` pointing at the
    artifact (by an absolute URI: scoring may run anywhere)."""
    import os

    from anomaly_core import storage
    from anomaly_core.model import registry
    from anomaly_core.model.info import read_metadata
    from anomaly_core.training.fleet import fingerprint

    source = config.output if storage.is_s3(config.output) else os.path.abspath(config.output)
    validation = summary["validation_metrics"]
    data_fingerprint = data_fingerprint or fingerprint(
        args.data, args.category or "", *fingerprinted(args, config.detector, config.options))
    training = {k: getattr(args, k) for k in (
        "data", "category", "val_fraction", "val_data", "objective", "num_workers", "batch_size",
        "epochs", "precision", "input_pipeline", "seed", "tile", "tiled_size", "tile_stride")}
    version = registry.log_training(
        product, source=source, detector=config.detector,
        params={**config.options, **training, "category": product,
                **({"auto_pick": auto["auto_pick"]} if auto else {})},
        metrics={**{k if k.startswith("val_") else f"val_{k}": v
                    for k, v in validation.items()},
                 # --detector auto: every candidate's objective, and which was kept
                 **{f"auto_objective.{k}": v for k, v in (auto or {}).get(
                     "auto_candidates", {}).items() if v is not None}},
        history=read_metadata(config.output)["training"].get("history", []),
        summary=summary,
        tags={"model_version": summary["model_version"], "fingerprint": summary["fingerprint"],
              "data_fingerprint": data_fingerprint,
              **{f"val_{k.removeprefix('val_')}": f"{v:.4f}" for k, v in validation.items()
                 if k.removeprefix("val_") in ("image_auroc", "pixel_auroc")
                 and isinstance(v, float)}})
    log.info("registered %s version %d (%s) in %s", product, version.version,
             ",".join(version.aliases) or "no alias", registry.shown_uri())
    return {"product": product, "version": version.version, "aliases": list(version.aliases),
            "run_id": version.run_id}


if __name__ == "__main__":
    run_job(main)
