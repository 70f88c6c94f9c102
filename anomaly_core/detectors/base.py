"""The Detector contract: two families (memory, gradient), one forward, one output type."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AnomalyOutput:
    """Per-image anomaly score [B] and anomaly map [B,H,W] at input resolution; higher = worse."""

    score: torch.Tensor
    map: torch.Tensor


@dataclass
class DetectorConfig:
    """Fields every detector has; each detector's config adds its own with its defaults."""

    image_size: int = 256
    backbone: str = ""
    weights: str = "imagenet"


class Detector(nn.Module):
    """Base class. Memory detectors implement observe/finalize, gradient ones training_step/optimizers.

    `forward` takes float images [B,3,H,W] in [0,1] at `config.image_size`.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # "memory" | "gradient"
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    # Memory detectors: the buffers fit() fills (what tiling keeps per tile position).
    statistics: ClassVar[tuple[str, ...]] = ()
    # What --precision auto runs on a GPU: fp16 where it was measured faster (anomaly_core/features/precision.py)
    gpu_precision: ClassVar[str] = "fp16"

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.frozen: list[nn.Module] = []  # kept in eval mode whatever train() says

    @classmethod
    def fit_state_bytes(cls, config: DetectorConfig) -> int | None:
        """Bytes of fit-time statistics, known before fitting; None when not known up front."""
        return None

    # memory family
    def observe(self, images: torch.Tensor) -> None:
        raise NotImplementedError(f"{self.name} is a {self.family} detector; it has no observe()")

    def finalize(self) -> None:
        raise NotImplementedError(f"{self.name} is a {self.family} detector; it has no finalize()")

    # gradient family
    def training_step(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} is a {self.family} detector; no training_step()")

    def optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError(f"{self.name} is a {self.family} detector; no optimizers()")

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        raise NotImplementedError

    def check_fit_memory(self, device: torch.device) -> None:
        """Raise (naming the options that shrink it) when fitting cannot fit on `device`."""

    def train(self, mode: bool = True) -> Detector:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    @property
    def weight_source(self) -> str:
        """Where the pretrained part came from, for the artifact's provenance."""
        default = getattr(getattr(self, "backbone", None), "weight_source", "none")
        return self.__dict__.get("_weight_source", default)

    @weight_source.setter
    def weight_source(self, value: str) -> None:
        # A loaded artifact keeps the provenance of the weights it was fitted with.
        self.__dict__["_weight_source"] = value

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @classmethod
    def pretrained_weights(cls, config: DetectorConfig) -> list[tuple[str, str]]:
        """(backbone, weights) pairs the detector loads when built; jobs check them up front."""
        return [(config.backbone, config.weights)] if config.backbone else []


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B,H,W] maps (the papers' sigma=4 smoothing)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    pad = min(radius, maps.shape[-1] - 1, maps.shape[-2] - 1)
    out = F.pad(out, (pad, pad, pad, pad), mode="reflect")
    out = F.pad(out, (radius - pad,) * 4, mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [B,h,w] maps to the input size."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def load_weights(detector: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load that adopts the state's tensors as they are (memory-mapped ones stay mapped).

    Buffers whose shape is only known after fitting get a shape-only placeholder first, so no
    full-size copy is ever allocated.
    """
    for key, tensor in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = detector.get_submodule(owner_name) if owner_name else detector
        buf = owner._buffers.get(attr)
        if buf is not None and buf.shape != tensor.shape:
            owner._buffers[attr] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    # assign: the module takes the state's tensors instead of copying into its own.
    detector.load_state_dict(state, strict=True, assign=True)
