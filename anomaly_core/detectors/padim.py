"""PaDiM: a Gaussian per feature-map position over frozen CNN features; Mahalanobis distance map."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from anomaly_core.detectors import register
from anomaly_core.detectors.base import (
    AnomalyOutput,
    Detector,
    DetectorConfig,
    gaussian_blur,
    upsample,
)
from anomaly_core.features.backbones import FeatureExtractor, freeze

# The paper's random channel subset sizes; other backbones keep at most DEFAULT_FEATURES.
PAPER_FEATURES = {"wide_resnet50_2": 550, "resnet18": 100}
DEFAULT_FEATURES = 100
# The sums of outer products live in chunks of positions of about this size, so that finalize()
# can free each chunk once inverted and every per-chunk temporary stays this small.
CHUNK_BYTES = 128 * 2**20
GIB = 2**30


@dataclass
class PadimConfig(DetectorConfig):
    image_size: int = 256
    backbone: str = "wide_resnet50_2"
    weights: str = "imagenet"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    n_features: int | None = None  # None: 550 for wide_resnet50_2, 100 for resnet18 and others
    seed: int = 0  # fixes the random channel subset
    regularization: float = 0.01  # covariance + reg * I
    blur_sigma: float = 4.0
    # float64 sums make N workers agree with one to ~1e-12; float32 halves the (large) memory.
    accumulate_dtype: str = "float64"


class FitMemoryError(ValueError):
    """The fit-time statistics do not fit on the device; the message names what reduces them."""


def n_features(config: PadimConfig, total: int) -> int:
    """Size of the random channel subset out of `total` backbone channels."""
    d = config.n_features or min(PAPER_FEATURES.get(config.backbone, DEFAULT_FEATURES), total)
    if not 0 < d <= total:
        raise ValueError(f"padim n_features={d} must be in 1..{total} for {config.backbone}")
    return d


@functools.lru_cache(maxsize=64)
def _feature_shape(backbone: str, layers: tuple[str, ...], image_size: int) -> tuple[int, int]:
    # (positions, channels) from a weightless copy on the meta device: exact for any backbone,
    # no memory, no weights file, a fraction of a second.
    with torch.device("meta"):
        feats = FeatureExtractor(backbone, layers, "random")(
            torch.empty(1, 3, image_size, image_size)
        )
    return feats[0].shape[-2] * feats[0].shape[-1], sum(f.shape[1] for f in feats)


def _stats_shape(config: PadimConfig) -> tuple[int, int] | None:
    """(positions, d) of the statistics; None when the backbone cannot be sized up front."""
    try:
        positions, total = _feature_shape(config.backbone, tuple(config.layers), config.image_size)
    except (RuntimeError, NotImplementedError):  # an op without a meta kernel
        return None
    return positions, n_features(config, total)


def stats_bytes(positions: int, d: int, dtype: str) -> int:
    """Bytes of the running sums: a d-vector and a d x d matrix per position."""
    return positions * (d + d * d) * getattr(torch, dtype).itemsize


def available_memory(device: torch.device | str) -> int | None:
    """Bytes the device can still allocate (CUDA: free + this process's cache), None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    found = [v for v in (_meminfo_available(), cgroup_available()) if v is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration):
        return None


# Per cgroup version: mount point, limit file, usage file, reclaimable page cache in memory.stat.
_CGROUP = {
    "v2": ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
    "v1": (
        "/sys/fs/cgroup/memory",
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "total_inactive_file",
    ),
}


def cgroup_available(proc_cgroup: str = "/proc/self/cgroup", root: str = "/") -> int | None:
    """Tightest limit - usage (+ reclaimable cache) from this process's cgroup up; None if none.

    A container's limit is often far below the host's MemAvailable, and it is what kills.
    """
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return None
    best = None
    for _, controllers, path in lines:
        version = (
            "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
        )
        if version is None:
            continue
        mount, limit_file, usage_file, cache_key = _CGROUP[version]
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # limits may sit on any ancestor
            folder = os.path.join(root, mount.lstrip("/"), *parts[:depth])
            try:
                with open(os.path.join(folder, limit_file)) as f:
                    limit = f.read().strip()
                with open(os.path.join(folder, usage_file)) as f:
                    usage = int(f.read())
            except (OSError, ValueError):
                continue
            if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as ~2^63
                continue
            cache = 0
            try:
                with open(os.path.join(folder, "memory.stat")) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        cache = int(value) if key == cache_key else cache
            except (OSError, ValueError):
                pass
            free = max(int(limit) - usage + cache, 0)
            best = free if best is None else min(best, free)
    return best


def check_memory(
    config: PadimConfig, available: int | None, device: str = "cpu", needed: int | None = None
) -> None:
    """Raise FitMemoryError if `needed` (default fit_state_bytes) + scratch exceeds `available`."""
    needed = Padim.fit_state_bytes(config) if needed is None else needed
    if available is None or needed is None:
        return
    spare = min(2 * CHUNK_BYTES, needed)  # finalize()'s scratch: a chunk and its float32 inverse
    if needed + spare <= available:
        return
    raise FitMemoryError(
        f"padim needs {_size(needed)} for its statistics (+{_size(spare)} working space) on "
        f"{device} but {_size(available)} is free; reduce it with "
        + "; ".join(_reductions(config, available - spare) or ["a larger device"])
    )


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _reductions(config: PadimConfig, budget: int) -> list[str]:
    # Each option on its own, with what it would need, so the message gives numbers to pick from.
    def size(**change) -> str | None:
        try:
            stats = Padim.fit_state_bytes(dataclasses.replace(config, **change))
        except ValueError:  # e.g. n_features above what fewer layers have
            return None
        return None if stats is None else _size(stats)

    options = []
    if config.accumulate_dtype == "float64":
        half = size(accumulate_dtype="float32")
        options.append(f"accumulate_dtype=float32 ({half + ', ' if half else ''}halves it)")
    shape = _stats_shape(config)
    if shape is None:
        return options + ["n_features", "image_size", "layers"]
    positions, d = shape
    itemsize = getattr(torch, config.accumulate_dtype).itemsize
    # Largest d with positions * (d + d^2) * itemsize <= budget.
    fit_d = int((math.sqrt(1 + 4 * max(budget, 0) / (positions * itemsize)) - 1) / 2)
    if 0 < fit_d < d:
        options.append(f"n_features={fit_d} ({size(n_features=fit_d)}; now {d})")
    side = math.isqrt(max(budget, 0) // (stats_bytes(1, d, config.accumulate_dtype)))
    stride = math.ceil(config.image_size / math.isqrt(positions))
    fit_size = side * stride // 32 * 32  # a multiple of 32, as CNN input sizes usually are
    if 0 < fit_size < config.image_size:
        options.append(
            f"image_size={fit_size} ({size(image_size=fit_size)}; now {config.image_size})"
        )
    fewer = tuple(config.layers[1:])
    if fewer and size(layers=fewer):
        options.append(f"layers={list(fewer)} ({size(layers=fewer)}: a coarser grid)")
    return options


@register
class Padim(Detector):
    """Patch Distribution Modeling (Defard et al. 2020)."""

    name = "padim"
    family = "memory"
    statistics = ("mean", "inv_covariance")
    Config = PadimConfig

    def __init__(self, config: PadimConfig) -> None:
        super().__init__(config)
        self.backbone = freeze(FeatureExtractor(config.backbone, config.layers, config.weights))
        self.frozen = [self.backbone]
        total = sum(self.backbone.channels)
        d = n_features(config, total)
        generator = torch.Generator().manual_seed(config.seed)
        index = torch.randperm(total, generator=generator)[:d].sort().values
        self.register_buffer("channel_index", index)
        stride = self.backbone.strides[0]
        self.grid = (config.image_size // stride, config.image_size // stride)
        # Filled by finalize(); load_weights() resizes them from an artifact.
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("inv_covariance", torch.zeros(0))
        self._reset()

    def _reset(self) -> None:
        # Running sums: x [hw, d], and x x^T as a list of [positions, d, d] chunks.
        self._count, self._sum, self._outer = 0, None, None

    @classmethod
    def fit_state_bytes(cls, config: PadimConfig) -> int | None:
        """Bytes of the per-position sums (vector + outer product) in accumulate_dtype."""
        shape = _stats_shape(config)
        return None if shape is None else stats_bytes(*shape, config.accumulate_dtype)

    def check_fit_memory(self, device: torch.device | str, needed: int | None = None) -> None:
        """Raise FitMemoryError, naming what reduces it, if the statistics exceed `device`."""
        check_memory(self.config, available_memory(device), str(device), needed)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features of all layers at the first layer's grid, channel subset: [B, d, h, w]."""
        feats = self.backbone(images)
        size = feats[0].shape[-2:]
        parts, start = [], 0
        for f in feats:
            # Subset first, then resize: only the kept channels are upsampled (same result).
            stop = start + f.shape[1]
            keep = self.channel_index[(self.channel_index >= start) & (self.channel_index < stop)]
            if keep.numel():
                # Gathered channels-last ([B, h, w, c] rows), which the resize and the
                # concatenation keep, so forward's subtraction reads each position's vector
                # in order (from NCHW that pass took as long as the Mahalanobis product).
                f = f.permute(0, 2, 3, 1).index_select(3, keep - start).permute(0, 3, 1, 2)
                parts.append(
                    f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest")
                )
            start = stop
        return torch.cat(parts, dim=1)

    def _chunks(self, hw: int, d: int, dtype: torch.dtype) -> list[tuple[int, int]]:
        step = max(1, CHUNK_BYTES // (d * d * dtype.itemsize))
        return [(p, min(p + step, hw)) for p in range(0, hw, step)]

    @torch.no_grad()
    def observe(self, images: torch.Tensor) -> None:
        dtype = getattr(torch, self.config.accumulate_dtype)
        emb = self.embed(images).flatten(2)  # [B, d, hw]
        _, d, hw = emb.shape
        device = emb.device
        if self._sum is None:
            self.check_fit_memory(device, needed=stats_bytes(hw, d, self.config.accumulate_dtype))
            self._sum = torch.zeros(hw, d, dtype=dtype, device=device)
            self._outer = [
                torch.zeros(q - p, d, d, dtype=dtype, device=device)
                for p, q in self._chunks(hw, d, dtype)
            ]
        # fit() may run this under bf16 autocast; the sums stay in accumulate_dtype.
        with torch.autocast(device.type, enabled=False):
            for (p, q), outer in zip(self._chunks(hw, d, dtype), self._outer):
                # [positions, B, d], chunk-sized; contiguous, as strided the GEMM ran 30x slower.
                x = emb[:, :, p:q].permute(2, 0, 1).to(dtype, memory_format=torch.contiguous_format)
                self._sum[p:q] += x.sum(dim=1)
                outer.baddbmm_(x.transpose(1, 2), x)  # in place: no [positions, d, d] temporary
        self._count += emb.shape[0]

    @torch.no_grad()
    def finalize(self) -> None:
        if self._sum is None:
            raise ValueError("padim saw no training images; observe() at least two first")
        count = torch.tensor([float(self._count)], dtype=self._sum.dtype, device=self._sum.device)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            # Sums and outer products add across ranks: N workers give the one-worker Gaussian.
            dist.all_reduce(count)
            dist.all_reduce(self._sum)
        n = count.item()
        if n < 2:
            self._reset()
            raise ValueError(f"padim needs at least 2 training images, got {int(n)}")
        mean = self._sum / n
        inverses, p = [], 0
        outer = self._outer
        self._reset()  # `outer` is now the only reference: each chunk is freed once inverted
        for i in range(len(outer)):
            cov, outer[i] = outer[i], None
            if distributed:
                dist.all_reduce(cov)
            m = mean[p : p + len(cov)]
            # In place: cov = (sum x x^T - n m m^T) / (n - 1) + reg I, then its inverse.
            cov.baddbmm_(m.unsqueeze(2), m.unsqueeze(1), alpha=-n).div_(n - 1)
            cov.diagonal(dim1=1, dim2=2).add_(self.config.regularization)
            # On the column-major view LAPACK factors and inverts in place (no chunk copy); the
            # matrices are symmetric, so the row-major view then holds the inverse too.
            cov_t = cov.mT
            info = torch.empty(len(cov), dtype=torch.int32, device=cov.device)
            torch.linalg.cholesky_ex(cov_t, out=(cov_t, info))
            if info.any():
                raise ValueError(
                    f"padim covariance is not positive definite at {int((info != 0).sum())} of "
                    f"positions {p}..{p + len(cov) - 1}; raise regularization "
                    f"(now {self.config.regularization})"
                )
            torch.cholesky_inverse(cov_t, out=cov_t)
            inverses.append(cov.float())
            del cov, cov_t
            p += len(inverses[-1])
        self.mean = mean.float()
        # One [hw, d, d] tensor, contiguous as a loaded copy is (scores must match bit for bit).
        self.inv_covariance = torch.cat(inverses)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.mean.numel() == 0:
            raise RuntimeError("padim is not fitted; run fit() or load an artifact")
        emb = self.embed(images)
        b, d, h, w = emb.shape
        # [hw, B, d], written contiguous by the subtraction itself for the batched product:
        # einsum on the strided view copied each position's operands and took 3x as long
        # (CPU, 550 dims, 4,096 positions).
        delta = emb.new_empty(h * w, b, d)
        torch.sub(emb.permute(2, 3, 0, 1).reshape(h * w, b, d), self.mean.unsqueeze(1), out=delta)
        dist2 = (torch.bmm(delta, self.inv_covariance) * delta).sum(-1)  # [hw, B]
        maps = dist2.clamp_min(0).sqrt().T.reshape(b, h, w)
        maps = gaussian_blur(upsample(maps, images.shape[-2:]), self.config.blur_sigma)
        return AnomalyOutput(score=maps.flatten(1).max(dim=1).values, map=maps)
