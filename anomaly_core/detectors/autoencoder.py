"""Autoencoder trained to reconstruct normal images; its per-pixel reconstruction error is the map.

From scratch (about 100K parameters, raw pixels) or a frozen ImageNet encoder with a trained decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_core.detectors import register
from anomaly_core.detectors.base import AnomalyOutput, Detector, DetectorConfig, gaussian_blur
from anomaly_core.features.backbones import FeatureExtractor, freeze
from anomaly_core.features.precision import network_autocast, network_output


@dataclass
class AutoencoderConfig(DetectorConfig):
    image_size: int = 256  # the MVTec AD convention of anomalib and the papers
    # Used only with transfer_learning: resnet18 / resnet34 / resnet50 (or mobilenet_v2) encoder.
    backbone: str = "resnet18"
    weights: str = "imagenet"
    transfer_learning: bool = False
    # From scratch: one stride-2 conv stage per entry (the decoder mirrors them), so image_size
    # must be divisible by 2 ** len(channels). These defaults give 98K parameters.
    channels: tuple[int, ...] = (16, 32, 48, 64)
    latent_channels: int = 32  # 1x1 bottleneck at 1/16 resolution: 24x fewer numbers than pixels
    # Transfer learning: decoder stages from the encoder's bottleneck (512 / 512 / 2048 channels
    # for resnet18 / 34 / 50) up to the image, one 2x upsampling per entry.
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    ssim_weight: float = 0.0  # loss = MSE + ssim_weight * (1 - SSIM); 0 is pixel MSE only
    # Error-map smoothing in pixels; None: 4 px per 256 px of image_size (1 at 64 px), so the
    # smoothing covers the same share of the image at any size (4 px at 96 px blurs a defect of
    # a few pixels away: image AUROC 0.43 against 0.56 at 1.5 px, capsule, 20 epochs).
    blur_sigma: float | None = None
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.1))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    # Nearest upsampling + conv instead of transposed conv: no checkerboard pattern in the error map.
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _conv(c_in, c_out))


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, radius: int = 5) -> torch.Tensor:
    """Mean structural similarity of [B,C,H,W] images in [0,1] (Gaussian 11x11 window)."""
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(c, 1, -1, -1)

    def blur(a: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(a, (radius,) * 4, mode="reflect"), kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean()


@register
class Autoencoder(Detector):
    """Reconstruction autoencoder; from scratch or with a frozen pretrained encoder."""

    name = "autoencoder"
    family = "gradient"
    gpu_precision = "fp32"  # 16 bits measured no faster on an H200
    Config = AutoencoderConfig

    @classmethod
    def pretrained_weights(cls, config: AutoencoderConfig) -> list[tuple[str, str]]:
        return [(config.backbone, config.weights)] if config.transfer_learning else []

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__(config)
        if config.transfer_learning:
            self.encoder = freeze(FeatureExtractor(config.backbone, ["layer4"], config.weights))
            self.frozen = [self.encoder]
            self.weight_source = self.encoder.weight_source
            self.stride = self.encoder.strides[0]
            chans = [self.encoder.channels[0], *config.decoder_channels]
            if 2 ** len(config.decoder_channels) != self.stride:
                raise ValueError(
                    f"autoencoder decoder_channels has {len(config.decoder_channels)} stages but "
                    f"{config.backbone}'s bottleneck is at stride {self.stride}; give one entry per 2x"
                )
            self.decoder = nn.Sequential(
                *(_up(a, b) for a, b in zip(chans[:-1], chans[1:])),
                nn.Conv2d(chans[-1], 3, 3, padding=1),
                nn.Sigmoid(),
            )
        else:
            if not config.channels:
                raise ValueError(
                    "autoencoder channels is empty; give at least one stage, e.g. (16, 32, 48, 64)"
                )
            chans = [3, *config.channels]
            self.stride = 2 ** len(config.channels)
            self.encoder = nn.Sequential(
                *(_conv(a, b, stride=2) for a, b in zip(chans[:-1], chans[1:])),
                nn.Conv2d(chans[-1], config.latent_channels, 1),  # linear bottleneck
            )
            rev = chans[::-1]
            self.decoder = nn.Sequential(
                nn.Conv2d(config.latent_channels, rev[0], 1),
                nn.LeakyReLU(0.1),
                *(_up(a, b) for a, b in zip(rev[:-2], rev[1:-1])),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(rev[-2], 3, 3, padding=1),
                nn.Sigmoid(),
            )
        if config.image_size % self.stride:
            raise ValueError(
                f"autoencoder image_size={config.image_size} is not divisible by its total stride "
                f"{self.stride}; pick a multiple of {self.stride}"
            )

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The decoder's [0,1] reconstruction of images [B,3,H,W]."""
        if images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise ValueError(
                f"autoencoder input {tuple(images.shape[-2:])} is not divisible by its stride "
                f"{self.stride}; resize images to image_size={self.config.image_size}"
            )
        with network_autocast(images):
            if self.config.transfer_learning:
                with torch.no_grad():  # the encoder is frozen: no activations kept for backward
                    code = self.encoder(images)[0]
            else:
                code = self.encoder(images)
            return network_output(self.decoder(code))

    def training_step(self, images: torch.Tensor) -> torch.Tensor:
        recon = self.reconstruct(images)
        loss = F.mse_loss(recon, images)
        if self.config.ssim_weight > 0:
            loss = loss + self.config.ssim_weight * (1 - ssim(recon, images))
        return loss

    def optimizers(self) -> list[torch.optim.Optimizer]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        error = (self.reconstruct(images) - images).pow(2).mean(dim=1)  # [B,H,W]
        sigma = self.config.blur_sigma
        if sigma is None:
            sigma = 4.0 * self.config.image_size / 256
        maps = gaussian_blur(error, sigma)
        return AnomalyOutput(score=maps.flatten(1).max(dim=1).values, map=maps)
