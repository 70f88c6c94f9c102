"""SimpleNet: a trained adaptor over frozen CNN features and a discriminator that tells them from
noise-perturbed copies; the discriminator's output is the anomaly score of each patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_core.detectors import register
from anomaly_core.detectors.base import (
    AnomalyOutput,
    Detector,
    DetectorConfig,
    gaussian_blur,
    upsample,
)
from anomaly_core.features.backbones import FeatureExtractor, freeze


@dataclass
class SimplenetConfig(DetectorConfig):
    image_size: int = 288  # the paper's input: resize to 329, centre crop 288
    backbone: str = "resnet50"  # or wide_resnet50_2 (the paper's) / mobilenet_v2 / resnet18
    weights: str = "imagenet"
    layers: tuple[str, ...] = ("layer2", "layer3")
    # 1: each feature-map position is its own vector (the specification's default);
    # 3: the paper's 3x3 neighbourhood aggregation, done as a local average that keeps the dim.
    patch_size: int = 1
    # sigma of the Gaussian noise that makes the synthetic anomalies. The paper's 0.015 is absolute
    # and fits its WideResNet-50 features pooled to 1536 dims, which have hundreds of directions
    # thinner than that; on features whose thinnest direction is wider (mobilenet_v2 layer2+3:
    # 128 dims, thinnest std 0.064, mean per-channel std 0.58) noised and clean vectors are alike,
    # the loss stays at 1.0 and nothing is learnt. About half the features' mean per-channel std
    # works (0.12-0.5 measured; README "SimpleNet's noise and rates").
    noise_std: float = 0.3
    hidden: int = 512  # discriminator hidden units (paper: 1024)
    batchnorm: bool = False  # BatchNorm1d after the hidden layer (paper: True)
    margin: float = 0.5  # th of the truncated L1 loss
    # 10x the paper's 1e-4 / 2e-4, which were sized for its ~5,000 steps (160 passes over ~250
    # images): the same solution in 80-160 steps, stable to 640 measured.
    adaptor_lr: float = 1e-3
    discriminator_lr: float = 2e-3
    weight_decay: float = 1e-5
    blur_sigma: float = 4.0


def _init_linear(module: nn.Module) -> None:
    # The official code's init: Xavier-normal weights for the adaptor and the discriminator.
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)


@register
class Simplenet(Detector):
    """SimpleNet (Liu et al. 2023)."""

    name = "simplenet"
    family = "gradient"
    Config = SimplenetConfig

    def __init__(self, config: SimplenetConfig) -> None:
        super().__init__(config)
        if config.patch_size < 1 or config.patch_size % 2 == 0:
            raise ValueError(
                f"simplenet patch_size={config.patch_size} must be odd and positive (1 or 3)"
            )
        self.backbone = freeze(FeatureExtractor(config.backbone, config.layers, config.weights))
        self.frozen = [self.backbone]
        dim = sum(self.backbone.channels)
        self.adaptor = nn.Linear(dim, dim)
        layers: list[nn.Module] = [nn.Linear(dim, config.hidden)]
        if config.batchnorm:
            layers.append(nn.BatchNorm1d(config.hidden))
        layers += [nn.LeakyReLU(0.2), nn.Linear(config.hidden, 1)]
        self.discriminator = nn.Sequential(*layers)
        self.adaptor.apply(_init_linear)
        self.discriminator.apply(_init_linear)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen features of all layers on the first layer's grid, concatenated: [B, dim, h, w]."""
        feats = self.backbone(images)
        p = self.config.patch_size
        if p > 1:
            feats = [
                F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=False) for f in feats
            ]
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]
        ]
        return torch.cat(feats, dim=1)

    def adapted(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Adapted feature vectors z [B*h*w, dim] and the grid (h, w)."""
        emb = self.embed(images)
        grid = (emb.shape[-2], emb.shape[-1])
        return self.adaptor(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])), grid

    def margin_losses(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated-L1 terms (clean: mean relu(th - D(z)), noised: mean relu(th + D(z')))."""
        z, _ = self.adapted(images)
        # z' keeps z's graph, so the adaptor learns from both terms.
        noised = z + self.config.noise_std * torch.randn_like(z)
        # One call on both halves, as the official code does, so a BatchNorm sees both.
        scores = self.discriminator(torch.cat([z, noised]))[:, 0]
        clean_scores, noised_scores = scores[: len(z)], scores[len(z) :]
        th = self.config.margin
        return F.relu(th - clean_scores).mean(), F.relu(th + noised_scores).mean()

    def training_step(self, images: torch.Tensor) -> torch.Tensor:
        clean, noised = self.margin_losses(images)
        return clean + noised

    def optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.config
        groups = [
            {"params": list(self.adaptor.parameters()), "lr": cfg.adaptor_lr},
            {"params": list(self.discriminator.parameters()), "lr": cfg.discriminator_lr},
        ]
        return [torch.optim.Adam(groups, weight_decay=cfg.weight_decay)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        z, (h, w) = self.adapted(images)  # no noise at inference
        grid = -self.discriminator(z)[:, 0].reshape(len(images), h, w)
        maps = gaussian_blur(upsample(grid, images.shape[-2:]), self.config.blur_sigma)
        # The paper's image score: the highest patch score, before upsampling and blur.
        return AnomalyOutput(score=grid.flatten(1).max(dim=1).values, map=maps)
