"""STPM: a random-init student learns a frozen ImageNet teacher's features on normal images;
where the two disagree is anomalous."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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

MAP_REDUCTIONS = ("product", "sum")


@dataclass
class StpmConfig(DetectorConfig):
    image_size: int = 256  # the paper's and anomalib's input size
    backbone: str = "resnet18"  # resnet18 / resnet50 / wide_resnet50_2 / mobilenet_v2
    weights: str = "imagenet"  # the teacher's; the student always starts random
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    map_reduction: str = "product"  # how per-layer maps combine: "product" (paper) or "sum"
    blur_sigma: float = 4.0  # the reference code's sigma-4 smoothing of the map
    lr: float = 0.4  # SGD, as in the paper
    momentum: float = 0.9
    weight_decay: float = 1e-4


def _distances(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, 0.5 * squared distance of channel-L2-normalised features: [B,h,w] in [0, 2]."""
    return [
        0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(dim=1)
        for t, s in zip(teacher, student)
    ]


@register
class Stpm(Detector):
    """Student-Teacher Feature Pyramid Matching (Wang et al. 2021)."""

    name = "stpm"
    family = "gradient"
    gpu_precision = "fp32"  # 16 bits measured no faster on an H200
    Config = StpmConfig

    def __init__(self, config: StpmConfig) -> None:
        super().__init__(config)
        if config.map_reduction not in MAP_REDUCTIONS:
            raise ValueError(
                f"stpm map_reduction={config.map_reduction!r}; choose one of {MAP_REDUCTIONS}"
            )
        if not config.layers:
            raise ValueError("stpm layers is empty; give e.g. ('layer1', 'layer2', 'layer3')")
        self.teacher = freeze(FeatureExtractor(config.backbone, config.layers, config.weights))
        # Same architecture, never loaded: the student must learn the teacher's features itself.
        self.student = FeatureExtractor(config.backbone, config.layers, "random")
        self.frozen = [self.teacher]
        self.weight_source = self.teacher.weight_source

    def training_step(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(images)
        # Mean over positions, sum over the batch and layers, as the reference code (and
        # anomalib) compute it: lr 0.4 was tuned for this scale.
        return sum(d.mean(dim=(1, 2)).sum() for d in _distances(teacher, self.student(images)))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        params = [p for p in self.parameters() if p.requires_grad]
        c = self.config
        return [torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        size = images.shape[-2:]
        layer_maps = [
            upsample(d, size) for d in _distances(self.teacher(images), self.student(images))
        ]
        maps = layer_maps[0]
        for m in layer_maps[1:]:
            maps = maps * m if self.config.map_reduction == "product" else maps + m
        maps = gaussian_blur(maps, self.config.blur_sigma)
        return AnomalyOutput(score=maps.flatten(1).max(dim=1).values, map=maps)
