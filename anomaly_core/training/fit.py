"""The one training loop, for both detector families, in one process or under torch.distributed.

Ray Train's worker function and Ray Tune's trials call `fit`; nothing else trains a detector.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from anomaly_core.data.datasets import to_unit_float
from anomaly_core.detectors.base import Detector

# report(metrics, state): called after every epoch (once for memory detectors); `state` is what
# a checkpoint must hold to resume (gradient detectors), or None.
EpochReport = Callable[[dict, "dict | None"], None]
Validate = Callable[[Detector], dict]
SELECTION_METRIC = "objective"  # higher is better; from the validation hook
PRECISIONS = ("fp32", "bf16")
# An epoch's batches for this rank: fit's alternative to a dataset and its DataLoader.
EpochBatches = Callable[[int], Iterable[dict]]


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def select_device(
    use_gpu: bool,
    local_rank: int = 0,
    visible: str | None = None,
    device_count: int | None = None,
    gpu_ids: Sequence[int | str] | None = None,
) -> torch.device:
    """This rank's own device: a CUDA ordinal among the devices its process sees, or the CPU.

    `visible`: CUDA_VISIBLE_DEVICES (from the environment when None); `device_count`: how many
    CUDA devices torch sees (torch's count when None); `gpu_ids`: the physical GPUs the
    scheduler gave this worker (`ray.get_gpu_ids()`). With gpu_ids the ordinal is the first
    one's position in `visible`, as Ray's get_device() picks it; without, the local rank's.
    """
    if not use_gpu:
        return torch.device("cpu")
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "<unset>" if visible is None else repr(visible)
    count = torch.cuda.device_count() if device_count is None else device_count
    if count == 0:
        raise RuntimeError(
            f"a GPU was asked for (use_gpu) but torch sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={shown}, torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); run on a GPU node or train without --use-gpu"
        )
    if gpu_ids:
        gpu = str(gpu_ids[0]).strip()
        if visible is None:  # unmasked: ordinals are the physical ids
            ordinal = int(gpu)
        else:
            listed = [v.strip() for v in visible.split(",") if v.strip()]
            if gpu not in listed:
                raise RuntimeError(
                    f"this worker was given GPU {gpu} but CUDA_VISIBLE_DEVICES={shown} does not "
                    "list it; something overrode CUDA_VISIBLE_DEVICES"
                )
            ordinal = listed.index(gpu)
        if ordinal >= count:
            raise RuntimeError(
                f"GPU {gpu} is CUDA ordinal {ordinal} but torch sees only {count} devices "
                f"(CUDA_VISIBLE_DEVICES={shown})"
            )
        return torch.device("cuda", ordinal)
    if local_rank < 0:
        raise ValueError(f"local rank {local_rank} is negative")
    if count == 1:
        # The scheduler masked all but this worker's GPU: device 0 whatever the rank.
        return torch.device("cuda", 0)
    # One process sees the node's GPUs (shared among its workers): one per local rank.
    if local_rank >= count:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: this process sees {count} CUDA "
            f"devices (CUDA_VISIBLE_DEVICES={shown}); start at most {count} GPU workers per node"
        )
    return torch.device("cuda", local_rank)


def bind_device(device: str | torch.device) -> torch.device:
    """Make `device` this process's current CUDA device, before any NCCL collective.

    NCCL creates its communicator on the current device; unbound, every rank of a node would
    use cuda:0.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": whatever is current, made explicit
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _derived_seed(*entropy: int) -> int:
    """A 64-bit seed mixed from non-negative ints, different for every tuple."""
    words = np.random.SeedSequence([e % 2**64 for e in entropy]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def seed_for_rank(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed torch (CPU and CUDA), numpy and random with a seed of its own for (seed, rank, epoch).

    Call it after the detector is built (from the same seed on every rank, so random inits
    agree): from then on noise and augmentation differ between ranks. Returns the seed used.
    """
    value = _derived_seed(seed, rank, epoch)
    torch.manual_seed(value)  # also every CUDA device's generator
    np.random.seed(value % 2**32)
    random.seed(value)
    return value


def training_state(detector: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict entries training changes: trainable parameters, buffers outside frozen modules.

    Left out: parameters with requires_grad False (a frozen backbone or teacher) and every buffer
    of a module in `detector.frozen` (kept in eval mode, so its BatchNorm statistics never move).
    A frozen-listed module whose parameters train (FastFlow's fine-tuned backbone) keeps them.
    """
    frozen = {id(m) for m in getattr(detector, "frozen", [])}
    prefixes = tuple(
        f"{name}." for name, m in detector.named_modules(remove_duplicate=False) if id(m) in frozen
    )
    params = dict(detector.named_parameters(remove_duplicate=False))
    state = {}
    for key, value in detector.state_dict().items():
        param = params.get(key)
        keep = param.requires_grad if param is not None else not key.startswith(prefixes)
        if keep:
            state[key] = value
    return state


def load_training_state(detector: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a training_state() into a detector built with the same config; nothing may be left over.

    The frozen parts are not in `state`: they come from building the detector again (same
    weights, same seed).
    """
    expected, present = set(training_state(detector)), set(detector.state_dict())
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - present)
    if missing or unknown:
        raise ValueError(
            f"checkpoint does not fit this {type(detector).__name__}: missing trainable entries "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), unknown entries "
            f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} ({len(unknown)}); was it written "
            "with another detector config?"
        )
    result = detector.load_state_dict(dict(state), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above


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


def _images(batch: dict, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A batch's images on the device as floats in [0, 1] (uint8 batches are converted there)."""
    images = batch["image"].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = to_unit_float(images)
    return images.contiguous(memory_format=memory_format)


def _fit_memory(
    detector: Detector, dataset: Dataset | None, loader_kwargs: dict, device, precision, validate,
    batches: EpochBatches | None,
) -> dict:
    rank, size = world()
    if batches is None:
        # Every image exactly once across ranks (no padding): the reduction must equal one worker's.
        shard = Subset(dataset, range(rank, len(dataset), size))
        source = DataLoader(shard, shuffle=False, **loader_kwargs)
    else:
        source = batches(0)
    detector.eval()
    seen, start = 0, time.perf_counter()
    with torch.no_grad():
        for batch in source:
            with autocast(device, precision):
                detector.observe(_images(batch, device))
            seen += len(batch["image"])
    observed = time.perf_counter() - start
    detector.finalize()
    metrics = {"epoch": 0, "images": seen, "images_per_s": seen / max(observed, 1e-9)}
    if validate is not None:
        with autocast(device, precision):
            metrics.update(validate(detector))
    return metrics


def _fit_gradient(
    detector: Detector,
    dataset: Dataset | None,
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
    batches: EpochBatches | None,
) -> dict:
    rank, size = world()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        detector.to(memory_format=torch.channels_last)
    step_module: nn.Module = _TrainingStep(detector)
    sampler = None
    if size > 1:
        ids = [device.index] if device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids)
    # A batch stream shards, shuffles and balances the ranks' batches itself.
    if batches is None and size > 1:
        # Padded so every rank takes the same number of steps (DDP would hang otherwise).
        sampler = DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed)
    elif batches is None:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    optimizers = detector.optimizers()
    best = {"epoch": -1, "metric": None, "state": None}
    start_epoch, history = 0, []  # history: every epoch's numbers, for run tracking
    if resume is not None:
        load_training_state(detector, resume["detector"])
        for opt, state in zip(optimizers, resume["optimizers"]):
            opt.load_state_dict(state)
        best, start_epoch = resume["best"], resume["epoch"] + 1
        history = list(resume.get("history", []))
    # Its own generator: the loader workers' seeds differ per rank and epoch (see below).
    loader_rng = torch.Generator()
    loader = None if batches is not None else DataLoader(
        dataset, sampler=sampler, drop_last=False, generator=loader_rng, **loader_kwargs
    )
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # the same permutation on every rank, from `seed`
        elif sampler is not None:  # a resumed run must shuffle epoch e as the uninterrupted run did
            sampler.generator.manual_seed(seed + epoch)
        # Noise (SimpleNet's), dropout and loader workers draw differently on each rank, and
        # epoch e draws the same in a resumed run as in the uninterrupted one.
        seed_for_rank(seed, rank, epoch)
        loader_rng.manual_seed(_derived_seed(seed, rank, epoch, 1))
        detector.train()
        total, steps, seen, start = torch.zeros(2, device=device), 0, 0, time.perf_counter()
        for batch in loader if batches is None else batches(epoch):
            images = _images(batch, device, memory_format)
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
            best["state"] = {k: v.detach().clone() for k, v in training_state(detector).items()}
        metrics["best_epoch"] = best["epoch"]
        history.append({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        if report is not None:
            state = {
                "epoch": epoch,
                # Only what training changes: the frozen parts are rebuilt from the config.
                "detector": training_state(detector),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "best": best,
                "history": history,
            }
            report(metrics, state)
    if best["state"] is not None and best["epoch"] != metrics.get("epoch"):
        load_training_state(detector, best["state"])
    detector.eval()
    return {**metrics, "history": history}


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
    batches: EpochBatches | None = None,
) -> dict:
    """Fit `detector` on `dataset` (items with an "image" tensor) and return the last epoch's metrics
    (a gradient fit's with `history`, every epoch's numbers).

    `batches(epoch)`, when given, replaces the dataset and its DataLoader: an iterable of this
    rank's batches ({"image": float or uint8 [B,3,H,W]}) for that epoch, already sharded across
    ranks (every rank the same number of batches) and shuffled, e.g. a Ray Data shard's
    iter_torch_batches; `dataset` is then unused.

    Under torch.distributed each rank sees its shard; memory detectors reduce their state in
    finalize(), gradient detectors are wrapped in DDP. `validate(detector)` runs after each
    epoch (after finalize for memory detectors) and its metrics are reported; for gradient
    detectors the epoch with the highest `objective` is kept; `resume` is a `state` that
    `report` received, to continue after it. `device` becomes the process's current CUDA
    device (bind_device). Gradient detectors: each epoch reseeds the global RNGs with
    seed_for_rank(seed, rank, epoch), so ranks draw different noise and a resumed run draws
    what the uninterrupted one drew; checkpoints hold training_state(), not the frozen parts.
    """
    device = bind_device(device)  # before DDP's and finalize()'s collectives
    detector.to(device)
    loader_kwargs = dict(
        batch_size=batch_size,
        num_workers=loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=loader_workers > 0,
    )
    if batches is None and len(dataset) == 0:
        raise ValueError("fit() got an empty training set; check the data path and split")
    if detector.family == "memory":
        metrics = _fit_memory(detector, dataset, loader_kwargs, device, precision, validate,
                              batches)
        if report is not None:
            report(metrics, None)
        return metrics
    return _fit_gradient(
        detector, dataset, loader_kwargs, device, epochs=epochs, seed=seed, report=report,
        validate=validate, resume=resume, precision=precision, channels_last=channels_last,
        batches=batches,
    )
