"""The one training loop, for both detector families, in one process or under torch.distributed.

Ray Train's worker function and Ray Tune's trials call `fit`; nothing else trains a detector.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from anomaly_core.detectors.base import Detector

# report(metrics, state): called after every epoch (once for memory detectors); `state` is what
# a checkpoint must hold to resume (gradient detectors), or None.
EpochReport = Callable[[dict, "dict | None"], None]
Validate = Callable[[Detector], dict]
SELECTION_METRIC = "objective"  # higher is better; from the validation hook
PRECISIONS = ("fp32", "bf16")


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def steps_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch on each rank: the data is split (padded) evenly over ranks."""
    return math.ceil(math.ceil(n_images / world_size) / batch_size)


class _TrainingStep(nn.Module):
    # DDP synchronises gradients of whatever its module's forward() computes; this makes
    # that forward the detector's training_step, so DDP needs nothing detector-specific.
    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.training_step(images)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked (the GPU path), else nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fit_memory(
    detector: Detector, dataset: Dataset, loader_kwargs: dict, device, precision, validate
) -> dict:
    rank, size = world()
    # Every image exactly once across ranks (no padding): the reduction must equal one worker's.
    shard = Subset(dataset, range(rank, len(dataset), size))
    detector.eval()
    seen = 0
    with torch.no_grad():
        for batch in DataLoader(shard, shuffle=False, **loader_kwargs):
            with autocast(device, precision):
                detector.observe(batch["image"].to(device, non_blocking=True))
            seen += len(batch["image"])
    detector.finalize()
    metrics = {"epoch": 0, "images": seen}
    if validate is not None:
        with autocast(device, precision):
            metrics.update(validate(detector))
    return metrics


def _fit_gradient(
    detector: Detector,
    dataset: Dataset,
    loader_kwargs: dict,
    device: torch.device,
    *,
    epochs: int,
    seed: int,
    report: EpochReport | None,
    validate: Validate | None,
    resume: dict | None,
    precision: str,
    channels_last: bool,
) -> dict:
    rank, size = world()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        detector.to(memory_format=torch.channels_last)
    step_module: nn.Module = _TrainingStep(detector)
    if size > 1:
        # Padded so every rank takes the same number of steps (DDP would hang otherwise).
        sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed)
        ids = [device.index] if device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    optimizers = detector.optimizers()
    best = {"epoch": -1, "metric": None, "state": None}
    start_epoch = 0
    if resume is not None:
        detector.load_state_dict(resume["detector"])
        for opt, state in zip(optimizers, resume["optimizers"]):
            opt.load_state_dict(state)
        best, start_epoch = resume["best"], resume["epoch"] + 1
    loader = DataLoader(dataset, sampler=sampler, drop_last=False, **loader_kwargs)
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        else:  # a resumed run must shuffle epoch e as the uninterrupted run did
            sampler.generator.manual_seed(seed + epoch)
        detector.train()
        total, steps, seen, start = torch.zeros(2, device=device), 0, 0, time.perf_counter()
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = step_module(images)
            loss.float().backward()
            for opt in optimizers:
                opt.step()
            total += torch.stack([loss.detach().float() * len(images),
                                  torch.tensor(float(len(images)), device=device)])
            steps += 1
            seen += len(images)
        if size > 1:
            dist.all_reduce(total)
        metrics = {
            "epoch": epoch,
            "loss": (total[0] / total[1]).item(),
            "steps": steps,
            "images": seen,
            "images_per_s": seen / max(time.perf_counter() - start, 1e-9),
        }
        if validate is not None:
            detector.eval()
            with autocast(device, precision):
                metrics.update(validate(detector))
        value = metrics.get(SELECTION_METRIC)
        # The best epoch is chosen on the validation split only; without one, the last epoch.
        if value is None or best["metric"] is None or value > best["metric"]:
            best = {"epoch": epoch, "metric": value, "state": None}
        if best["epoch"] == epoch and epoch < epochs - 1:
            best["state"] = copy.deepcopy(detector.state_dict())
        metrics["best_epoch"] = best["epoch"]
        if report is not None:
            state = {
                "epoch": epoch,
                "detector": detector.state_dict(),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "best": best,
            }
            report(metrics, state)
    if best["state"] is not None and best["epoch"] != metrics.get("epoch"):
        detector.load_state_dict(best["state"])
    detector.eval()
    return metrics


def fit(
    detector: Detector,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    epochs: int = 1,
    device: str | torch.device = "cpu",
    loader_workers: int = 0,
    seed: int = 0,
    report: EpochReport | None = None,
    validate: Validate | None = None,
    resume: dict | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict:
    """Fit `detector` on `dataset` (items with an "image" tensor) and return the last epoch's metrics.

    Under torch.distributed each rank sees its shard; memory detectors reduce their state in
    finalize(), gradient detectors are wrapped in DDP. `validate(detector)` runs after each
    epoch (after finalize for memory detectors) and its metrics are reported; for gradient
    detectors the epoch with the highest `objective` is kept; `resume` is a `state` that
    `report` received, to continue after it.
    """
    device = torch.device(device)
    detector.to(device)
    loader_kwargs = dict(
        batch_size=batch_size,
        num_workers=loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=loader_workers > 0,
    )
    if len(dataset) == 0:
        raise ValueError("fit() got an empty training set; check the data path and split")
    if detector.family == "memory":
        metrics = _fit_memory(detector, dataset, loader_kwargs, device, precision, validate)
        if report is not None:
            report(metrics, None)
        return metrics
    return _fit_gradient(
        detector, dataset, loader_kwargs, device, epochs=epochs, seed=seed, report=report,
        validate=validate, resume=resume, precision=precision, channels_last=channels_last,
    )
