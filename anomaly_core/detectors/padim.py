"""PaDiM: a Gaussian per feature-map position over frozen CNN features; Mahalanobis distance map."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from anomaly_core.backbones import FeatureExtractor, freeze
from anomaly_core.detectors import register
from anomaly_core.detectors.base import (
    AnomalyOutput,
    Detector,
    DetectorConfig,
    gaussian_blur,
    upsample,
)

# The paper's random channel subset sizes; other backbones keep at most DEFAULT_FEATURES.
PAPER_FEATURES = {"wide_resnet50_2": 550, "resnet18": 100}
DEFAULT_FEATURES = 100


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


@register
class Padim(Detector):
    """Patch Distribution Modeling (Defard et al. 2020)."""

    name = "padim"
    family = "memory"
    Config = PadimConfig

    def __init__(self, config: PadimConfig) -> None:
        super().__init__(config)
        self.backbone = freeze(FeatureExtractor(config.backbone, config.layers, config.weights))
        self.frozen = [self.backbone]
        total = sum(self.backbone.channels)
        d = config.n_features or min(PAPER_FEATURES.get(config.backbone, DEFAULT_FEATURES), total)
        if not 0 < d <= total:
            raise ValueError(f"padim n_features={d} must be in 1..{total} for {config.backbone}")
        generator = torch.Generator().manual_seed(config.seed)
        index = torch.randperm(total, generator=generator)[:d].sort().values
        self.register_buffer("channel_index", index)
        stride = self.backbone.strides[0]
        self.grid = (config.image_size // stride, config.image_size // stride)
        # Filled by finalize(); load_weights() resizes them from an artifact.
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("inv_covariance", torch.zeros(0))
        self.register_buffer("covariance", torch.zeros(0), persistent=False)
        self._count, self._sum, self._outer = 0, None, None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Features of all layers at the first layer's grid, channel subset: [B, d, h, w]."""
        feats = self.backbone(images)
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [F.interpolate(f, size=size, mode="nearest") for f in feats[1:]]
        return torch.cat(feats, dim=1)[:, self.channel_index]

    @torch.no_grad()
    def observe(self, images: torch.Tensor) -> None:
        dtype = getattr(torch, self.config.accumulate_dtype)
        x = self.embed(images).flatten(2).permute(2, 0, 1).to(dtype)  # [hw, B, d]
        if self._sum is None:
            hw, _, d = x.shape
            self._sum = torch.zeros(hw, d, dtype=dtype, device=x.device)
            self._outer = torch.zeros(hw, d, d, dtype=dtype, device=x.device)
        self._count += x.shape[1]
        self._sum += x.sum(dim=1)
        self._outer += torch.bmm(x.transpose(1, 2), x)

    @torch.no_grad()
    def finalize(self) -> None:
        if self._sum is None:
            raise ValueError("padim saw no training images; observe() at least two first")
        count = torch.tensor([float(self._count)], dtype=self._sum.dtype, device=self._sum.device)
        if dist.is_available() and dist.is_initialized():
            # Sums and outer products add across ranks: N workers give the one-worker Gaussian.
            for t in (count, self._sum, self._outer):
                dist.all_reduce(t)
        n = count.item()
        if n < 2:
            raise ValueError(f"padim needs at least 2 training images, got {int(n)}")
        mean = self._sum / n
        cov = (self._outer - n * mean.unsqueeze(2) * mean.unsqueeze(1)) / (n - 1)
        cov += self.config.regularization * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        self.mean = mean.float()
        self.covariance = cov.float()
        # contiguous: inv() returns column-major, and a loaded copy must compute bit-identically.
        self.inv_covariance = torch.linalg.inv(cov).float().contiguous()
        self._count, self._sum, self._outer = 0, None, None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.mean.numel() == 0:
            raise RuntimeError("padim is not fitted; run fit() or load an artifact")
        emb = self.embed(images)
        b, d, h, w = emb.shape
        delta = emb.flatten(2).permute(2, 0, 1) - self.mean.unsqueeze(1)  # [hw, B, d]
        dist2 = torch.einsum("pbd,pde,pbe->pb", delta, self.inv_covariance, delta)
        maps = dist2.clamp_min(0).sqrt().T.reshape(b, h, w)
        maps = gaussian_blur(upsample(maps, images.shape[-2:]), self.config.blur_sigma)
        return AnomalyOutput(score=maps.flatten(1).max(dim=1).values, map=maps)
