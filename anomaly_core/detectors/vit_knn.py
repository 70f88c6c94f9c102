"""ViT k-NN: normal CLS features and patch tokens of a frozen ViT stored as memory banks; an
image scores by its CLS distance to the k nearest normal ones, a patch by its token's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anomaly_core.detectors import register
from anomaly_core.detectors.base import (
    AnomalyOutput,
    Detector,
    DetectorConfig,
    gaussian_blur,
    upsample,
)
from anomaly_core.features.backbones import TORCHVISION_MODELS, ViTExtractor, freeze
from anomaly_core.features.coreset import StreamingCoreset, gather_and_reduce
from anomaly_core.features.knn import knn, knn_dtype, knn_products

GIB = 1 << 30
# The CLS bank (one row per image) gets this share of the budget, the patch tokens the rest.
CLS_BUDGET_SHARE = 1 / 8
IMAGE_SCORES = ("cls", "patch_max")


@dataclass
class VitKnnConfig(DetectorConfig):
    image_size: int = 224  # the ViT's native input; its 16 px patches make the 14x14 map
    backbone: str = "google/vit-base-patch16-224"  # a transformers ViT
    weights: str = "imagenet"  # random: a randomly initialised ViT of the same shape
    k: int = 1  # neighbours averaged, for the CLS score and for each patch
    image_score: str = "cls"  # or "patch_max": the largest patch distance
    # Share of patch tokens kept (greedy coreset, as PatchCore); 1.0 keeps every token while
    # the budget holds them, then the budget's coreset.
    patch_coreset_ratio: float = 1.0
    memory_budget_gb: float | None = 4.0  # per worker, both banks' building state together
    projection_dim: int = 128
    knn_dtype: str = "auto"  # products of the k-NN search: as PatchCore's
    blur_sigma: float = 4.0
    seed: int = 0


@register
class VitKnn(Detector):
    """k-nearest-neighbour anomaly detection on frozen ViT features."""

    name = "vit_knn"
    family = "memory"
    statistics = ("cls_bank", "patch_bank")
    Config = VitKnnConfig

    def __init__(self, config: VitKnnConfig) -> None:
        super().__init__(config)
        if config.backbone in TORCHVISION_MODELS or config.backbone.startswith("timm:"):
            raise ValueError(
                f"vit_knn backbone {config.backbone!r} is a CNN; give a transformers ViT such as "
                "google/vit-base-patch16-224"
            )
        if config.image_score not in IMAGE_SCORES:
            raise ValueError(
                f"vit_knn image_score={config.image_score!r} must be one of {IMAGE_SCORES}"
            )
        if config.k < 1:
            raise ValueError(f"vit_knn k={config.k} must be >= 1")
        if config.memory_budget_gb is not None and config.memory_budget_gb <= 0:
            raise ValueError(
                f"vit_knn memory_budget_gb={config.memory_budget_gb} must be > 0, or None for no bound"
            )
        self.knn_dtype = knn_dtype(config.knn_dtype)
        self.new_reducers()  # a bad ratio or budget fails here, not after the first batch
        self.backbone = freeze(ViTExtractor(config.backbone, config.weights))
        self.frozen = [self.backbone]
        if config.image_size != self.backbone.image_size:
            raise ValueError(
                f"vit_knn image_size={config.image_size} but {config.backbone} takes "
                f"{self.backbone.image_size} px; set image_size={self.backbone.image_size}"
            )
        dim = self.backbone.dim
        self.grid = self.backbone.image_size // self.backbone.patch_size
        # Filled by finalize(); load_weights() resizes them from an artifact.
        self.register_buffer("cls_bank", torch.zeros(0, dim))
        self.register_buffer("patch_bank", torch.zeros(0, dim))
        self.reducers: tuple[StreamingCoreset, StreamingCoreset] | None = None
        self.fit_stats: dict = {}

    def new_reducers(self) -> tuple[StreamingCoreset, StreamingCoreset]:
        """(CLS, patch-token) bank builders sharing the memory budget."""
        c = self.config
        cls_budget = patch_budget = None
        if c.memory_budget_gb is not None:
            budget = int(c.memory_budget_gb * GIB)
            cls_budget = int(budget * CLS_BUDGET_SHARE)
            patch_budget = budget - cls_budget
        common = dict(projection_dim=c.projection_dim, seed=c.seed)
        # Ratio 1: every normal CLS is kept unless more images come than its budget holds.
        cls = StreamingCoreset(1.0, cls_budget, name="vit_knn cls", **common)
        patches = StreamingCoreset(
            c.patch_coreset_ratio, patch_budget, name="vit_knn patches", **common
        )
        return cls, patches

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS features [B, D] and patch tokens [B, h*w, D]."""
        cls, patches = self.backbone(images)
        return cls, patches.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def observe(self, images: torch.Tensor) -> None:
        if self.reducers is None:
            self.reducers = self.new_reducers()
        cls, patches = self.features(images)
        self.reducers[0].add(cls)
        self.reducers[1].add(patches.reshape(-1, patches.shape[-1]))

    @torch.no_grad()
    def finalize(self) -> None:
        # A rank with an empty shard still takes part in the merge (and an empty fit says so).
        (cls, patches), self.reducers = self.reducers or self.new_reducers(), None
        # Collective, in the same order on every rank; each ends with all ranks' banks.
        cls_bank, patch_bank = gather_and_reduce(cls), gather_and_reduce(patches)
        if len(cls_bank) < self.config.k:
            raise ValueError(
                f"vit_knn k={self.config.k} needs at least {self.config.k} training images; "
                f"got {len(cls_bank)}"
            )
        device = self.cls_bank.device
        self.cls_bank = cls_bank.to(device, torch.float32).contiguous()
        self.patch_bank = patch_bank.to(device, torch.float32).contiguous()
        self.fit_stats = {
            "images_seen": cls.seen,
            "cls_bank_rows": len(cls_bank),
            "patch_rows_seen": patches.seen,
            "patch_bank_rows": len(patch_bank),
            "peak_bytes": cls.peak_bytes + patches.peak_bytes,
            "capped": cls.capped or patches.capped,
        }

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.cls_bank.numel() == 0:
            raise RuntimeError("vit_knn is not fitted; run fit() or load an artifact")
        cls, patches = self.features(images)
        b, n, d = patches.shape
        k = self.config.k
        products = knn_products(self.knn_dtype, self.patch_bank.device)
        patch_dist, _ = knn(
            patches.reshape(-1, d),
            self.patch_bank,
            min(k, len(self.patch_bank)),
            dtype=products,
        )
        grid = patch_dist.mean(1).view(b, self.grid, self.grid)
        if self.config.image_score == "cls":
            cls_dist, _ = knn(cls, self.cls_bank, k, dtype=products)
            score = cls_dist.mean(1)
        else:
            score = grid.flatten(1).max(1).values
        maps = gaussian_blur(upsample(grid, images.shape[-2:]), self.config.blur_sigma)
        return AnomalyOutput(score=score, map=maps)
