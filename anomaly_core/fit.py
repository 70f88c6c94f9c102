"""The one training loop, for both detector families, in one process or under torch.distributed.

Ray Train's worker function and Ray Tune's trials call `fit`; nothing else trains a detector.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from anomaly_core.detectors.base import Detector

EpochReport = Callable[[dict], None]


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _TrainingStep(nn.Module):
    # DDP synchronises gradients of whatever its module's forward() computes; this makes
    # that forward the detector's training_step, so DDP needs nothing detector-specific.
    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.training_step(images)


def _fit_memory(detector: Detector, dataset: Dataset, loader_kwargs: dict, device) -> dict:
    rank, size = world()
    # Every image exactly once across ranks (no padding): the reduction must equal one worker's.
    shard = Subset(dataset, range(rank, len(dataset), size))
    detector.eval()
    seen = 0
    with torch.no_grad():
        for batch in DataLoader(shard, shuffle=False, **loader_kwargs):
            detector.observe(batch["image"].to(device, non_blocking=True))
            seen += len(batch["image"])
    detector.finalize()
    return {"epoch": 0, "images": seen}


def _fit_gradient(
    detector: Detector,
    dataset: Dataset,
    loader_kwargs: dict,
    device,
    epochs: int,
    seed: int,
    report: EpochReport | None,
) -> dict:
    rank, size = world()
    step_module: nn.Module = _TrainingStep(detector)
    if size > 1:
        # Padded so every rank takes the same number of steps (DDP would hang otherwise).
        sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed)
        ids = [device.index] if device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=ids, find_unused_parameters=False
        )
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    optimizers = detector.optimizers()
    loader = DataLoader(dataset, sampler=sampler, drop_last=False, **loader_kwargs)
    metrics: dict = {}
    for epoch in range(epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        detector.train()
        total, steps, seen, start = torch.zeros(2, device=device), 0, 0, time.perf_counter()
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = step_module(images)
            loss.backward()
            for opt in optimizers:
                opt.step()
            total += torch.stack([loss.detach() * len(images), torch.tensor(len(images), device=device)])
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
        if report is not None:
            report(metrics)
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
) -> dict:
    """Fit `detector` on `dataset` (items with an "image" tensor) and return the last epoch's metrics.

    Under torch.distributed each rank sees its shard; memory detectors reduce their state in
    finalize(), gradient detectors are wrapped in DDP. `report` is called after every epoch
    (once for memory detectors) with that epoch's metrics.
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
        metrics = _fit_memory(detector, dataset, loader_kwargs, device)
        if report is not None:
            report(metrics)
        return metrics
    return _fit_gradient(detector, dataset, loader_kwargs, device, epochs, seed, report)
