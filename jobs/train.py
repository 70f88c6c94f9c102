"""Fit a detector with Ray Train on N workers, calibrate it on a validation split, write the artifact.

    python -m jobs.train --data DIR_OR_S3 --category bottle --detector padim --output ARTIFACT_URI
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import yaml

from jobs.common import (
    add_cluster_flags,
    init_ray,
    log,
    parse_overrides,
    redacted,
    run_job,
    setup_logging,
    use_storage_flags,
)


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by jobs.train and jobs.tune: data, detector, validation, workers."""
    p.add_argument("--data", required=True, help="MVTec-layout root (with --category) or a folder of normal images; local or s3://")
    p.add_argument("--category", help="MVTec category: train on <data>/<category>/train/good")
    p.add_argument("--detector", default=None, help="registered detector name (default padim, or from --config)")
    p.add_argument("--config", help="YAML file: {detector: NAME, options: {...}, training: {...}}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="detector option, repeatable, e.g. --set backbone=resnet18 --set image_size=128")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of normal training images held out to calibrate the threshold")
    p.add_argument("--val-data", help="MVTec-layout root with labelled <category>/test defects for "
                   "calibration (never the data you evaluate on)")
    p.add_argument("--objective", default="image_auroc",
                   help="validation objective for the best epoch: image_auroc, pixel_auroc, aupro "
                   "or a weighted mix like image_auroc=0.7,aupro=0.3 (on labelled --val-data, "
                   "else on synthetic anomalies pasted into held-out normal images)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1, help="epochs for gradient detectors")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (the detector's `lr` option; others via --set)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 autocast (for GPUs)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--max-failures", type=int, default=3,
                   help="worker failures to survive, resuming from the last checkpoint")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    p.add_argument("--input-pipeline", choices=("loader", "ray-data"), default="loader",
                   help="loader: each worker reads and decodes with its own DataLoader; ray-data: "
                        "CPU tasks across the cluster decode (uint8) and stream shards to the "
                        "workers, so GPU workers are not starved by their own decoding")
    p.add_argument("--decode-cpus", type=float, default=1,
                   help="CPUs per decode task (--input-pipeline ray-data)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train checkpoints (local or s3://; on several nodes a path all of them "
                   "see); default <output>/checkpoints")
    p.add_argument("--tile", type=int,
                   help="high-resolution images: fit (and later score) the detector on square "
                        "tiles of this many pixels of the --tiled-size image")
    p.add_argument("--tiled-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                   help="working size images are resized to before tiling (with --tile)")
    p.add_argument("--tile-stride", type=int,
                   help="pixels between tiles (default: the tile, no overlap; smaller overlaps "
                        "them, and overlapping maps are averaged)")
    p.add_argument("--tile-batch", type=int, default=64, help="tiles per model call")
    p.add_argument("--tile-positions", choices=("shared", "own"), default="shared",
                   help="shared: one model for every tile position (textures; PatchCore's bank "
                        "of all tiles); own: each tile position keeps its own statistics, for "
                        "aligned parts where what is normal depends on where it is (padim, "
                        "patchcore, vit_knn)")
    p.add_argument("--seed", type=int, default=0)
    add_cluster_flags(p)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="artifact directory to write (local or s3://)")
    add_training_flags(p)
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
    if args.lr is not None:
        options["lr"] = args.lr
    return name, options


def training_records(args: argparse.Namespace) -> tuple[list, list]:
    """(train, validation) records: normal images split, plus labelled --val-data if given."""
    from anomaly_core.data.datasets import folder_records, mvtec_records, split_records

    if args.category:
        normal = mvtec_records(args.data, args.category, "train")
    else:
        normal = folder_records(args.data)
        normal = [type(r)(r.uri, label=0, defect="good") for r in normal]
    train, val = split_records(normal, args.val_fraction, seed=args.seed)
    if args.val_data:
        if not args.category:
            raise SystemExit("--val-data needs --category (an MVTec-layout test split)")
        val += mvtec_records(args.val_data, args.category, "test")
    if not train:
        raise SystemExit(f"no training images under {args.data}")
    if not val:
        raise SystemExit("no validation images: raise --val-fraction or pass --val-data")
    return train, val


def decode_for_training(batch: dict, size: tuple[int, int]) -> dict:
    """Ray Data task (--input-pipeline ray-data): uris -> uint8 images [B,3,H,W], resized as
    ImageDataset does; an unreadable training image fails the run naming it."""
    import numpy as np

    from anomaly_core import storage
    from anomaly_core.data.datasets import resize_image
    from anomaly_core.data.decode import decode_image

    images = [resize_image(decode_image(storage.read_bytes(str(uri)),
                                        str(uri)), size).numpy() for uri in batch["uri"]]
    return {"image": np.stack(images)}


def training_stream(args, cfg: dict):
    """The training images as a Ray Data dataset decoded on CPU tasks (uint8, model size)."""
    import ray

    from anomaly_core.detectors import make_config

    size = (tuple(cfg["tiling"]["size"]) if cfg.get("tiling")
            else (make_config(cfg["detector"], **cfg["options"]).image_size,) * 2)
    return ray.data.from_items([{"uri": r["uri"]} for r in cfg["train"]]).map_batches(
        decode_for_training, batch_size=cfg["batch_size"], num_cpus=args.decode_cpus,
        fn_kwargs={"size": size})


def epoch_batches(batch_size: int, seed: int):
    """fit()'s batches(epoch) from this worker's Ray Data shard: shuffled within a buffer, with
    another seed each epoch; Ray Train splits the stream equally, so ranks take equal steps."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int):
        return shard.iter_torch_batches(batch_size=batch_size, prefetch_batches=2,
                                        local_shuffle_buffer_size=4 * batch_size,
                                        local_shuffle_seed=seed + epoch)

    return batches


def _checkpointing_report(rank: int):
    """fit's report hook: every rank reports metrics; rank 0 attaches the resumable state."""
    import tempfile

    import ray.train
    import torch

    def report(metrics: dict, state: dict | None) -> None:
        # The objective of the epoch the fit keeps (the best so far), which a sweep ranks on.
        kept = state["best"]["metric"] if state is not None else metrics.get("objective")
        if kept is not None:
            metrics = {**metrics, "kept_objective": kept}
        if state is None or rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, f"{tmp}/state.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    return report


def _report_fatal(rank: int, error: str) -> None:
    """End the run normally with the reason: Ray Train retries a raised error max_failures times,
    and its Result keeps only metrics that came with a checkpoint, hence the tiny one."""
    import tempfile

    import ray.train

    metrics = {"fatal_error": error}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        with open(f"{tmp}/fatal_error.txt", "w") as f:
            f.write(error)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _resume_state() -> dict | None:
    """The state saved with the last reported checkpoint, when Ray Train restarted this run."""
    import ray.train
    import torch

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return torch.load(f"{path}/state.pt", map_location="cpu", weights_only=True)


OBJECTIVES = ("image_auroc", "pixel_auroc", "aupro")


def parse_objective(text: str) -> dict[str, float]:
    """"image_auroc" or a weighted mix "image_auroc=0.5,pixel_auroc=0.3,aupro=0.2"."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in OBJECTIVES:
            raise ValueError(f"objective {name!r}: choose from {OBJECTIVES} (or a weighted mix)")
        weights[name] = float(weight) if weight else 1.0
    return weights


def validation_hook(val, weights: dict[str, float], batch_size: int, device):
    """Per-epoch validation metrics and the `objective` (higher is better) on labelled images."""
    from anomaly_core.training import metrics
    from anomaly_core.training.evaluate import predict

    def validate(detector) -> dict:
        pred = predict(detector, val, batch_size=batch_size, device=device)
        out = {"val_image_auroc": metrics.image_auroc(pred["labels"], pred["scores"])}
        if "pixel_auroc" in weights:
            out["val_pixel_auroc"] = metrics.pixel_auroc(pred["masks"], pred["maps"])
        if "aupro" in weights:
            out["val_aupro"] = metrics.aupro(pred["masks"], pred["maps"])
        out["objective"] = sum(w * out[f"val_{k}"] for k, w in weights.items()) / sum(weights.values())
        return out

    return validate


def validation_sets(cfg: dict, size: tuple[int, int]):
    """(calibration set, objective set): labelled validation images when the user has defects;
    otherwise held-out normal images, plus the same with synthetic anomalies for the objective."""
    from anomaly_core.data.anomalies import SyntheticAnomalyDataset
    from anomaly_core.data.datasets import ImageDataset, ImageRecord

    records = [ImageRecord(**r) for r in cfg["val"]]
    calibration = ImageDataset(records, size)
    if any(r.label == 1 for r in records):
        return calibration, calibration
    return calibration, SyntheticAnomalyDataset(calibration, seed=cfg["seed"])


# Errors that repeat on every attempt (a bad option, weights missing on a node, data that cannot
# be read, statistics too large for the device): retrying them only buries the reason.
def _deterministic_errors() -> tuple[type[BaseException], ...]:
    from anomaly_core.features.backbones import WeightsUnavailableError
    from anomaly_core.model.artifact import ArtifactError
    from anomaly_core.storage import StorageError

    return (ValueError, WeightsUnavailableError, ArtifactError, StorageError, FileNotFoundError,
            MemoryError)


def _gather(value: Any) -> list:
    """`value` of every rank, in rank order (just this one's without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def train_worker(cfg: dict) -> None:
    """Ray Train worker: fit on this rank's shard; rank 0 validates, calibrates, writes the artifact."""
    import ray
    import ray.train
    import torch

    from anomaly_core.data.datasets import ImageDataset, ImageRecord
    from anomaly_core.detectors import build_detector
    from anomaly_core.detectors.tiling import input_size, tiled
    from anomaly_core.model.artifact import ModelArtifact, fingerprint
    from anomaly_core.training.evaluate import calibrate, predict
    from anomaly_core.training.fit import bind_device, fit, select_device

    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Set-up: everything that fails the same way on every attempt happens here, before training;
    # the ranks agree on the outcome and a failure ends the run once, with its reason.
    error = None
    try:
        # This rank's own GPU, current before any collective (NCCL builds on the current device).
        device = bind_device(select_device(cfg["use_gpu"], context.get_local_rank(),
                                           gpu_ids=ray.get_gpu_ids()))
        # The same seed on every rank: randomly initialised parts (a student, a random backbone
        # in tests) agree; fit() reseeds per rank, so noise and augmentation differ.
        torch.manual_seed(cfg["seed"])
        detector = tiled(build_detector(cfg["detector"], **cfg["options"]), cfg.get("tiling"))
        detector.check_fit_memory(device)  # PaDiM: its statistics must fit on the device
        size = input_size(detector)
        train = [ImageRecord(**r) for r in cfg["train"]]
        val, objective_set = validation_sets(cfg, size)
        resume = _resume_state()
    except (*_deterministic_errors(), RuntimeError) as exc:  # set-up's RuntimeErrors: no GPU, ...
        error = f"{type(exc).__name__}: {exc}"
    # Every rank learns whether any rank's set-up failed (and why), so all stop together.
    error = next((e for e in _gather(error) if e), None)
    if error:
        _report_fatal(rank, error)
        return
    stream = cfg["input_pipeline"] == "ray-data"
    metrics = fit(
        detector, None if stream else ImageDataset(train, size),
        batch_size=cfg["batch_size"], epochs=cfg["epochs"], device=device,
        loader_workers=cfg["loader_workers"], seed=cfg["seed"], report=_checkpointing_report(rank),
        validate=validation_hook(objective_set, cfg["objective"], cfg["batch_size"], device)
        if rank == 0 else None,
        resume=resume, precision=cfg["precision"], channels_last=cfg["channels_last"],
        batches=epoch_batches(cfg["batch_size"], cfg["seed"]) if stream else None,
    )
    nodes = _gather(ray.get_runtime_context().get_node_id())
    if rank == 0 and cfg["output"]:
        pred = predict(detector, val, batch_size=cfg["batch_size"], device=device)
        calibration, val_metrics = calibrate(pred["scores"], pred["maps"], pred["labels"], pred["masks"])
        val_metrics.update({k: v for k, v in metrics.items() if k.startswith("val_") or k == "objective"})
        artifact = ModelArtifact(
            detector=detector.cpu(),
            calibration=calibration,
            validation_metrics=val_metrics,
            training={
                "images": len(train),
                "validation_images": len(val),
                "fingerprint": fingerprint([r.uri for r in train]),
                "workers": context.get_world_size(),
                "nodes": sorted(set(nodes)),  # the Ray nodes the ranks ran on
                "epochs": cfg["epochs"],
                "best_epoch": metrics.get("best_epoch", 0),
                "last_epoch": metrics,
                "resumed_from_epoch": None if resume is None else resume["epoch"],
                **getattr(detector, "fit_stats", {}),  # e.g. PatchCore's bank size and peak memory
            },
        )
        artifact.save(cfg["output"])


def worker_config(args, name: str, options: dict, train: list, val: list, output: str | None) -> dict:
    """train_worker's config; output None trains and validates without writing an artifact."""
    from dataclasses import asdict

    from anomaly_core.detectors import detector_class, make_config
    from anomaly_core.detectors.tiling import Tiling, check_model_size, check_positions

    tiling = None
    if bool(args.tile) != bool(args.tiled_size):
        raise ValueError("--tile and --tiled-size go together: the tile side and the working size "
                         "(height width) images are resized to, e.g. --tiled-size 2048 2048 --tile 256")
    if args.tile_positions != "shared" and not args.tile:
        raise ValueError(f"--tile-positions {args.tile_positions} needs --tile and --tiled-size")
    if args.tile:
        tiling = Tiling(size=tuple(args.tiled_size), tile=args.tile, stride=args.tile_stride,
                        batch=args.tile_batch, positions=args.tile_positions)
        check_model_size(tiling, make_config(name, **options).image_size)
        check_positions(tiling, detector_class(name))
        tiling = tiling.to_dict()
    return {
        "detector": name, "options": options, "output": output,
        "train": [asdict(r) for r in train], "val": [asdict(r) for r in val],
        "batch_size": args.batch_size, "epochs": args.epochs, "loader_workers": args.loader_workers,
        "seed": args.seed, "precision": args.precision, "channels_last": args.channels_last,
        "objective": parse_objective(args.objective), "use_gpu": args.use_gpu,
        "input_pipeline": args.input_pipeline, "tiling": tiling,
    }


def make_trainer(args, cfg: dict, *, name: str | None = None, callbacks: list | None = None):
    """The TorchTrainer that runs train_worker on --num-workers workers, checkpointing each epoch."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anomaly_core import storage

    storage_path, storage_fs = args.storage_path, None
    if storage_path and storage.is_s3(storage_path):
        # Ray would build its own S3 client without our endpoint; hand it ours.
        storage_fs, storage_path = storage.filesystem(storage_path)
    return TorchTrainer(
        train_worker,
        train_loop_config=cfg,
        datasets={"train": training_stream(args, cfg)} if cfg["input_pipeline"] == "ray-data" else None,
        scaling_config=ScalingConfig(
            num_workers=args.num_workers, use_gpu=args.use_gpu,
            resources_per_worker={"CPU": args.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name or f"train-{cfg['detector']}-{int(time.time())}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def preflight_training(args, name: str, options: dict, output: str | None) -> tuple[list, list]:
    """Driver-side checks before Ray starts a worker: weights, data, output, resources, nodes.

    Returns the (train, validation) records; every failure raises with the input named (exit 2).
    """
    from jobs import preflight

    preflight.check_detector(name, options)
    train, val = training_records(args)
    for flag, uri in (("--output", output), ("--storage-path", args.storage_path)):
        if uri:
            preflight.check_writable(uri, flag=flag)
    init_ray(args.address)
    preflight.check_replicas(args.num_workers, args.cpus_per_worker, args.use_gpu,
                             "--num-workers", "--cpus-per-worker")
    preflight.check_nodes([args.data, args.val_data, output, args.storage_path], detector=name,
                          options=options)
    return train, val


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args = parse_args(argv)
    use_storage_flags(args)
    name, options = detector_options(args)
    from dataclasses import asdict

    from anomaly_core import storage
    from anomaly_core.detectors import make_config

    options = asdict(make_config(name, **options))  # fail on a bad option before any Ray work
    # Checkpoints go beside the artifact unless told otherwise: never a node's own disk.
    args.storage_path = args.storage_path or storage.join(args.output, "checkpoints")
    train, val = preflight_training(args, name, options, args.output)
    log.info("train %s: %d training, %d validation images; options %s",
             name, len(train), len(val), json.dumps(redacted(options)))
    cfg = worker_config(args, name, options, train, val, args.output)
    trainer = make_trainer(args, cfg)
    start = time.perf_counter()
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    fatal = (result.metrics or {}).get("fatal_error")
    if fatal:  # a set-up error every attempt would repeat: not retried, reported as bad input
        raise ValueError(f"the workers could not start training: {fatal}")
    # model.json is the record of what was trained (Ray keeps only checkpointed metrics).
    from anomaly_core.model.artifact import ModelArtifact

    meta = ModelArtifact.read_metadata(args.output)
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
    print(body)
    return summary


if __name__ == "__main__":
    run_job(main)
