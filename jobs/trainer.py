"""The Ray Train pieces jobs.train and jobs.tune share: the training flags, the worker function
around anomaly_core.training.train, and the TorchTrainer that runs it (the driver's checks
before it: jobs.preflight.preflight_training)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import yaml

from anomaly_core.config import TrainingConfig, parse_overrides
from anomaly_core.training.auto import DEFAULT_CANDIDATES
from jobs.common import add_cluster_flags


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by jobs.train and jobs.tune: data, detector, validation, workers."""
    p.add_argument("--data", required=True, help="MVTec-layout root (with --category) or a folder of normal images; local or s3://")
    p.add_argument("--category", help="MVTec category: train on <data>/<category>/train/good")
    p.add_argument("--detector", default=None,
                   help="registered detector name, or auto (default padim, or from --config)")
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
                   help="shared: one model for all tile positions (textures); own: each "
                        "position its own statistics (aligned parts; padim, patchcore, vit_knn)")
    p.add_argument("--seed", type=int, default=0)
    add_cluster_flags(p)


def train_parser(description: str = "") -> argparse.ArgumentParser:
    """jobs.train's command line: --output and the training flags."""
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=description)
    p.add_argument("--output", required=True, help="artifact directory to write (local or s3://)")
    p.add_argument("--product", help="the registered model this fit becomes a version of "
                                      "(default: --category, else the --data folder's name)")
    p.add_argument("--categories",
                   help="a plant: `all` categories under --data, or a,b,c: a model per product "
                        "(artifacts in <output>/<product>/), unchanged products skipped")
    p.add_argument("--max-concurrent", type=int, default=4, help="--categories: fits at once")
    p.add_argument("--auto-candidates", default=DEFAULT_CANDIDATES,
                   help="--detector auto: detectors (settings) to fit; best objective kept")
    p.add_argument("--products-per-gpu", type=int, default=4,
                   help="--categories, --use-gpu: memory detectors fit as tasks of 1/N GPU")
    p.add_argument("--register", action=argparse.BooleanOptionalAction, default=True,
                   help="log the run to MLflow, register the artifact as a new version")
    add_training_flags(p)
    return p


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


@dataclass(frozen=True)
class TrainerSettings:
    """How Ray Train runs a training: workers and their resources, retries, checkpoints."""

    num_workers: int
    cpus_per_worker: float
    use_gpu: bool
    max_failures: int  # worker failures survived, resuming from the last checkpoint
    storage_path: str | None  # Ray Train's checkpoints (local or s3://)
    decode_cpus: float  # per decode task of the ray-data input pipeline

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainerSettings:
        return cls(num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                   use_gpu=args.use_gpu, max_failures=args.max_failures,
                   storage_path=args.storage_path, decode_cpus=args.decode_cpus)


def train_worker(loop_config: dict) -> None:
    """Ray Train worker: anomaly_core.training.train on this rank, with Ray's checkpoints."""
    import ray
    import ray.train

    from anomaly_core.training.train import set_up_training, train_model

    config: TrainingConfig = loop_config["training"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    setup = set_up_training(config, context.get_local_rank(), gpu_ids=ray.get_gpu_ids(),
                            resume=_resume_state)
    if setup.error:  # every rank's set-up error, the same on all: each attempt would repeat it
        _report_fatal(rank, setup.error)
        return
    stream = config.input_pipeline == "ray-data"
    train_model(config, setup, rank=rank, world_size=context.get_world_size(),
                node=ray.get_runtime_context().get_node_id(), report=_checkpointing_report(rank),
                batches=_epoch_batches(config.batch_size, config.seed) if stream else None)


def _epoch_batches(batch_size: int, seed: int):
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


def make_trainer(settings: TrainerSettings, config: TrainingConfig, *, name: str | None = None,
                 callbacks: list | None = None):
    """The TorchTrainer that runs train_worker on its workers, checkpointing each epoch; with
    the ray-data input pipeline, Ray Data tasks decode the training images for it."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from anomaly_core import storage
    from anomaly_core.training.train import decode_for_training

    datasets = None
    if config.input_pipeline == "ray-data":
        uris = ray.data.from_items([{"uri": r.uri} for r in config.train])
        datasets = {"train": uris.map_batches(
            decode_for_training, batch_size=config.batch_size, num_cpus=settings.decode_cpus,
            fn_kwargs={"size": config.image_size})}
    storage_path, storage_fs = settings.storage_path, None
    if storage_path and storage.is_s3(storage_path):
        # Ray would build its own S3 client without our endpoint; hand it ours.
        storage_fs, storage_path = storage.filesystem(storage_path)
    return TorchTrainer(
        train_worker,
        train_loop_config={"training": config},
        datasets=datasets,
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers, use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name or f"train-{config.detector}-{int(time.time())}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
