"""One rank's training run, without Ray: set up (device, detector, validation sets), fit, and
on rank 0 predict, calibrate and save the ModelArtifact. Ray Train's worker function
(jobs/trainer.py) is a few lines around it; in one process it runs as it is."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from anomaly_core import storage
from anomaly_core.config import TrainingConfig
from anomaly_core.data.datasets import ImageDataset, resize_image
from anomaly_core.data.decode import decode_image
from anomaly_core.detectors import build_detector
from anomaly_core.detectors.base import Detector
from anomaly_core.detectors.tiling import input_size, tiled
from anomaly_core.errors import ArtifactError, WeightsUnavailableError
from anomaly_core.model.artifact import ModelArtifact, fingerprint
from anomaly_core.training.evaluate import calibrate, predict
from anomaly_core.training.fit import EpochBatches, EpochReport, bind_device, fit, select_device
from anomaly_core.training.validation import validation_hook, validation_sets

# Errors that repeat on every attempt (a bad option, weights missing on a node, data that cannot
# be read, statistics too large for the device): retrying them only buries the reason. Set-up's
# RuntimeErrors (no GPU, ...) count too.
SETUP_ERRORS = (ValueError, WeightsUnavailableError, ArtifactError, storage.StorageError,
                FileNotFoundError, MemoryError, RuntimeError)


@dataclass
class TrainingSetup:
    """A rank's state after set-up; `error` (the same on every rank) when any rank failed."""

    device: torch.device | None = None
    detector: Detector | None = None
    val: Dataset | None = None  # the calibration set
    objective_set: Dataset | None = None  # what the per-epoch objective is measured on
    resume: dict | None = None  # the state to continue from, when restarted
    error: str | None = None


def gather(value: Any) -> list:
    """`value` of every rank, in rank order (just this one's without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def set_up_training(config: TrainingConfig, local_rank: int = 0,
                    gpu_ids: Sequence[int | str] | None = None,
                    resume: Callable[[], dict | None] | None = None) -> TrainingSetup:
    """Everything that fails the same way on every attempt, before training: the ranks agree on
    the outcome (a collective under torch.distributed), so a failure ends the run once, with
    its reason in `error`. `resume()` gives the state to continue from, if any."""
    setup = TrainingSetup()
    try:
        # This rank's own GPU, current before any collective (NCCL builds on the current device).
        setup.device = bind_device(select_device(config.use_gpu, local_rank, gpu_ids=gpu_ids))
        # The same seed on every rank: randomly initialised parts (a student, a random backbone
        # in tests) agree; fit() reseeds per rank, so noise and augmentation differ.
        torch.manual_seed(config.seed)
        setup.detector = tiled(build_detector(config.detector, **config.options), config.tiling)
        setup.detector.check_fit_memory(setup.device)  # PaDiM: its statistics must fit
        setup.val, setup.objective_set = validation_sets(config.val, input_size(setup.detector),
                                                         config.seed)
        setup.resume = resume() if resume else None
    except SETUP_ERRORS as exc:
        setup.error = f"{type(exc).__name__}: {exc}"
    # Every rank learns whether any rank's set-up failed (and why), so all stop together.
    setup.error = next((e for e in gather(setup.error) if e), None)
    return setup


def train_model(config: TrainingConfig, setup: TrainingSetup, *, rank: int = 0,
                world_size: int = 1, node: str = "", report: EpochReport | None = None,
                batches: EpochBatches | None = None) -> dict:
    """Fit this rank (on `batches(epoch)`, a stream of its shard, or its own DataLoader); rank
    0 validates each epoch, then calibrates on the validation set and saves the artifact to
    config.output (none when it is None). Returns the fit's last metrics."""
    detector, device, train = setup.detector, setup.device, list(config.train)
    metrics = fit(
        detector, None if batches else ImageDataset(train, input_size(detector)),
        batch_size=config.batch_size, epochs=config.epochs, device=device,
        loader_workers=config.loader_workers, seed=config.seed, report=report,
        validate=validation_hook(setup.objective_set, config.objective, config.batch_size,
                                 device) if rank == 0 else None,
        resume=setup.resume, precision=config.precision, channels_last=config.channels_last,
        batches=batches,
    )
    history = metrics.pop("history", [])
    nodes = gather(node)
    if rank == 0 and config.output:
        pred = predict(detector, setup.val, batch_size=config.batch_size, device=device)
        calibration, val_metrics = calibrate(pred["scores"], pred["maps"], pred["labels"],
                                             pred["masks"])
        val_metrics.update({k: v for k, v in metrics.items()
                            if k.startswith("val_") or k == "objective"})
        artifact = ModelArtifact(
            detector=detector.cpu(),
            calibration=calibration,
            validation_metrics=val_metrics,
            training={
                "images": len(train),
                "validation_images": len(setup.val),
                "fingerprint": fingerprint([r.uri for r in train]),
                "workers": world_size,
                "nodes": sorted(set(nodes)),  # the Ray nodes the ranks ran on
                "epochs": config.epochs,
                "best_epoch": metrics.get("best_epoch", 0),
                "last_epoch": metrics,
                "history": history,  # every epoch's loss and validation metrics
                "resumed_from_epoch": None if setup.resume is None else setup.resume["epoch"],
                **getattr(detector, "fit_stats", {}),  # e.g. PatchCore's bank size, peak memory
            },
        )
        artifact.save(config.output)
    return metrics


def decode_for_training(batch: dict, size: tuple[int, int]) -> dict:
    """A decode task of the streamed input pipeline: uris -> uint8 images [B,3,H,W], resized as
    ImageDataset does; an unreadable training image fails the run naming it."""
    images = [resize_image(decode_image(storage.read_bytes(str(uri)), str(uri)), size).numpy()
              for uri in batch["uri"]]
    return {"image": np.stack(images)}
