"""FastFlow: a 2D normalizing flow per CNN feature level; low likelihood under it is anomalous.

The flow is written here in plain PyTorch (no FrEIA), step for step the AllInOneBlock that
anomalib's FastFlow runs, so the artifact holds every flow weight and permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_core.detectors import register
from anomaly_core.detectors.base import AnomalyOutput, Detector, DetectorConfig, upsample
from anomaly_core.features.backbones import FeatureExtractor, freeze

# FrEIA's AllInOneBlock scales the subnet output by 0.1 for a near-identity start.
SUBNET_SCALE = 0.1
# Its per-channel global scale is 0.1 * softplus_{beta=0.5}(g), positive with a gentle gradient;
# this g makes it 1 at the start.
GLOBAL_SCALE_FACTOR = 0.1
GLOBAL_SCALE_INIT = 2.0 * math.log(math.exp(0.5 * 10.0) - 1.0)


@dataclass
class FastflowConfig(DetectorConfig):
    image_size: int = 256  # the paper's and anomalib's input for the CNN backbones
    backbone: str = "resnet18"  # or resnet50 / wide_resnet50_2 / mobilenet_v2
    weights: str = "imagenet"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    flow_steps: int = 8  # flow depth per level
    # Subnet kernels: None picks the paper's setting, 3x3 in every step for resnet18 and
    # 3x3 / 1x1 alternating for the others; True / False force all-3x3 / alternating.
    conv3x3_only: bool | None = None
    hidden_ratio: float = 1.0  # subnet hidden channels / its input channels
    clamp: float = 2.0  # log-scale bound of each coupling: clamp * tanh(.)
    # The specification fine-tunes the backbone with the flows (at backbone_lr); False freezes
    # it, as the paper does.
    train_backbone: bool = True
    lr: float = 1e-3
    # 1e-5, not 1e-4: the flow loss is lowered by a backbone that makes its features alike (all
    # images, anomalous ones too, map near one point), so a fast backbone collapses. Measured on
    # synthetic capsule (96 px, ImageNet mobilenet_v2, 20 epochs): image AUROC 0.77 at 1e-4 (loss
    # -30000), 0.98 at 1e-5 (loss -8600), 0.99 frozen (loss -4900).
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-5
    seed: int = 0  # fixes the channel permutations between flow steps


class AffineCoupling(nn.Module):
    """One invertible flow step: affine coupling, per-channel affine, fixed channel permutation.

    The first ceil(C/2) channels pass through and condition a Conv-ReLU-Conv subnet that gives
    the log-scale s and shift t of the other half: y2 = x2 * exp(s) + t, with the soft clamp
    s = clamp * tanh(0.1 * raw) (FrEIA's AllInOneBlock form) so exp(s) stays in [e^-clamp, e^clamp].
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        hidden_ratio: float,
        clamp: float,
        permutation: torch.Tensor,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling step needs at least 2 channels to split, got {channels}")
        if sorted(permutation.tolist()) != list(range(channels)):
            raise ValueError(f"permutation must be a permutation of 0..{channels - 1}")
        self.clamp = clamp
        self.split = channels - channels // 2
        out = 2 * (channels - self.split)
        hidden = max(1, int(self.split * hidden_ratio))
        self.subnet = nn.Sequential(
            nn.Conv2d(self.split, hidden, kernel_size, padding="same"),
            nn.ReLU(),
            nn.Conv2d(hidden, out, kernel_size, padding="same"),
        )
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), GLOBAL_SCALE_INIT))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("permutation", permutation.clone().long())
        self.register_buffer("inverse_permutation", torch.argsort(permutation).long())

    def _scale_shift(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = SUBNET_SCALE * self.subnet(x1)
        s, t = a.chunk(2, dim=1)
        return self.clamp * torch.tanh(s), t

    def _log_global_scale(self) -> torch.Tensor:
        return torch.log(GLOBAL_SCALE_FACTOR * F.softplus(self.global_scale, beta=0.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y and log|det dy/dx| per sample [B]."""
        x1, x2 = x[:, : self.split], x[:, self.split :]
        s, t = self._scale_shift(x1)
        y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
        log_scale = self._log_global_scale()
        y = y * log_scale.exp() + self.global_offset
        logdet = s.flatten(1).sum(1) + log_scale.sum() * x[0, 0].numel()
        return y[:, self.permutation], logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """x such that forward(x)[0] == y."""
        y = y[:, self.inverse_permutation]
        y = (y - self.global_offset) * torch.exp(-self._log_global_scale())
        x1, y2 = y[:, : self.split], y[:, self.split :]
        s, t = self._scale_shift(x1)
        return torch.cat([x1, (y2 - t) * torch.exp(-s)], dim=1)


class Flow2d(nn.Module):
    """A sequence of coupling steps over one [B,C,h,w] feature level."""

    def __init__(self, steps: list[AffineCoupling]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z and the summed log|det| per sample [B]."""
        logdet = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_logdet = step(x)
            logdet = logdet + step_logdet
        return x, logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


@register
class Fastflow(Detector):
    """FastFlow (Yu et al. 2021), CNN backbones."""

    name = "fastflow"
    family = "gradient"
    Config = FastflowConfig

    def __init__(self, config: FastflowConfig) -> None:
        super().__init__(config)
        if config.flow_steps < 1:
            raise ValueError(f"fastflow flow_steps={config.flow_steps} must be 1 or more")
        self.backbone = FeatureExtractor(config.backbone, config.layers, config.weights)
        if not config.train_backbone:
            freeze(self.backbone)
        # BatchNorm statistics stay ImageNet's even when fine-tuning: per-worker batches are small
        # and the flows are fitted to features that must not drift with batch composition.
        self.frozen = [self.backbone]
        with torch.no_grad():
            probe = torch.zeros(1, 3, config.image_size, config.image_size)
            shapes = [f.shape[1:] for f in self.backbone(probe)]
        # LayerNorm over [C,h,w] as in anomalib: its shape fixes the input size.
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape)) for shape in shapes)
        conv3x3_only = config.conv3x3_only
        if conv3x3_only is None:
            conv3x3_only = config.backbone == "resnet18"
        generator = torch.Generator().manual_seed(config.seed)
        flows = []
        for shape in shapes:
            channels = shape[0]
            steps = [
                AffineCoupling(
                    channels,
                    kernel_size=1 if i % 2 == 1 and not conv3x3_only else 3,
                    hidden_ratio=config.hidden_ratio,
                    clamp=config.clamp,
                    permutation=torch.randperm(channels, generator=generator),
                )
                for i in range(config.flow_steps)
            ]
            flows.append(Flow2d(steps))
        self.flows = nn.ModuleList(flows)

    def _check_size(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"fastflow was built for {size}x{size} inputs (image_size; its LayerNorms are "
                f"sized for it), got {tuple(images.shape[-2:])}; resize the images or rebuild "
                "with that image_size"
            )

    def latents(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: z [B,C,h,w] and log|det| [B]."""
        self._check_size(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.train_backbone):
            features = self.backbone(images)
        zs, logdets = [], []
        for norm, flow, feature in zip(self.norms, self.flows, features):
            z, logdet = flow(norm(feature))
            zs.append(z)
            logdets.append(logdet)
        return zs, logdets

    def training_step(self, images: torch.Tensor) -> torch.Tensor:
        zs, logdets = self.latents(images)
        # anomalib's FastflowLoss: per level the mean over the batch, summed over levels.
        nll = [0.5 * z.pow(2).flatten(1).sum(1) - logdet for z, logdet in zip(zs, logdets)]
        return torch.stack([level.mean() for level in nll]).sum()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.config
        groups = [{"params": [*self.norms.parameters(), *self.flows.parameters()], "lr": cfg.lr}]
        if cfg.train_backbone:
            groups.append({"params": list(self.backbone.parameters()), "lr": cfg.backbone_lr})
        return [torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        zs, _ = self.latents(images)
        size = images.shape[-2:]
        # Minus the per-position likelihood exp(-0.5 mean z^2), averaged over levels (anomalib).
        maps = torch.stack([upsample(-torch.exp(-0.5 * z.pow(2).mean(1)), size) for z in zs])
        maps = maps.mean(0)
        return AnomalyOutput(score=maps.flatten(1).max(dim=1).values, map=maps)
