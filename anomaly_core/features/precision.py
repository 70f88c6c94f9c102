"""Reduced precision at inference: which parts run in 16 bits and which stay float32.

Inside `compute_precision("fp16")` (or "bf16") the networks (CNN and ViT backbones, the
autoencoder) run under that autocast and nearest-neighbour searches take 16-bit products with a
float32 re-rank of the few nearest candidates (PatchCore's and ViT-kNN's `knn_dtype="auto"`
also takes bf16 products at fp32 on CPUs with bf16 instructions: coreset.knn_products). What turns network outputs into scores
(Mahalanobis distances, cosine distances, flows' log-densities, discriminators, reconstruction
errors) stays float32: it subtracts nearly equal numbers. The setting is a context variable, so
each thread (each batch in flight in a model actor) has its own.

"auto" on a GPU is each detector's `gpu_precision`: fp16 where 16 bits were measured faster
on an H200 (docs/benchmarks.md: model ceilings at batch 32 and the forward against anomalib
at batch 16): PaDiM 1.19x, ViT-kNN 1.96x, SimpleNet 1.16x, FastFlow 1.01x and 1.40x; fp32 where
they were slower (PatchCore 0.91x and 0.96x, STPM 0.93x and 0.45x, autoencoder 0.99x: small
CNNs whose fp32 convolutions already run on TF32 tensor cores). fp16 rather than bf16: measured
on CPU (README, "Reduced precision"), bf16's 8-bit mantissa moves scores beyond the tolerance
(rank correlation with float32 0.996 for PaDiM and PatchCore, 0.98 for STPM), fp16's 10 bits
keep it (>= 0.999) at the same tensor-core speed. A batch whose scores come out non-finite in
16 bits is scored again in float32 (Scorer). "auto" is fp32 off GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LOW_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_LOW: ContextVar[torch.dtype | None] = ContextVar("anomaly_low_precision", default=None)


def resolve_precision(precision: str, device: torch.device, gpu_precision: str = "fp16") -> str:
    """"auto" is the detector's `gpu_precision` on a GPU and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    if precision == "auto":
        return gpu_precision if device.type == "cuda" else "fp32"
    return precision


@contextlib.contextmanager
def compute_precision(precision: str) -> Iterator[None]:
    """Networks and nearest-neighbour products in 16 bits inside, for "fp16" and "bf16"."""
    token = _LOW.set(LOW_DTYPES.get(precision))
    try:
        yield
    finally:
        _LOW.reset(token)


def low_precision_dtype() -> torch.dtype | None:
    """The 16-bit dtype inside compute_precision("fp16"/"bf16"), else None (float32)."""
    return _LOW.get()


def network_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The autocast a network's forward runs under: 16 bits when asked, else nothing."""
    dtype = _LOW.get()
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def network_output(t: torch.Tensor) -> torch.Tensor:
    """A network's output as the float32 the scoring head computes in (under 16 bits only)."""
    return t.float() if _LOW.get() is not None else t
