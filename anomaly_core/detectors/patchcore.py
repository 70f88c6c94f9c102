"""PatchCore: a coreset memory bank of locally aggregated CNN patch features, built streaming
within a memory budget and across ranks; a patch's score is its distance to the bank."""

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
from anomaly_core.features.coreset import StreamingCoreset, gather_and_reduce
from anomaly_core.features.knn import knn, knn_dtype, knn_products

GIB = 1 << 30


@dataclass
class PatchcoreConfig(DetectorConfig):
    # 224: the paper's network input (its images are resized to 256 and centre-cropped to 224).
    image_size: int = 224
    backbone: str = "wide_resnet50_2"
    weights: str = "imagenet"
    layers: tuple[str, ...] = ("layer2", "layer3")
    patch_size: int = 3  # local neighbourhood averaged around each position
    # The concatenation is pooled down to this many channels; fewer are kept as they are
    # (mobilenet_v2: 32 + 96, resnet18: 128 + 256), since pooling up only repeats values.
    feature_dim: int = 1024
    coreset_ratio: float = 0.1  # 0.01 is the paper's low-memory option
    projection_dim: int = 128  # random projection the greedy selection runs on
    num_neighbors: int = 9  # the paper's image-score re-weighting; 1 turns it off
    blur_sigma: float = 4.0
    # Bound on the bank-building state per worker (buffered patches + selection scratch);
    # None keeps every patch until one coreset at the end, as other implementations do.
    memory_budget_gb: float | None = 4.0
    # Products of the nearest-neighbour search (distances are then computed exactly in float32):
    # auto is bfloat16 on CPUs with bf16 instructions and the 16-bit precision of a
    # --precision fp16/bf16 run, float32 elsewhere; or float32, float16, bfloat16.
    knn_dtype: str = "auto"
    seed: int = 0  # fixes the projection and the greedy's first point


@register
class Patchcore(Detector):
    """Towards Total Recall in Industrial Anomaly Detection (Roth et al. 2022)."""

    name = "patchcore"
    family = "memory"
    statistics = ("memory_bank",)
    gpu_precision = "fp32"  # 16 bits measured no faster on an H200
    Config = PatchcoreConfig

    def __init__(self, config: PatchcoreConfig) -> None:
        super().__init__(config)
        if config.num_neighbors < 1:
            raise ValueError(
                f"patchcore num_neighbors={config.num_neighbors} must be >= 1 (1 turns re-weighting off)"
            )
        if config.patch_size < 1 or config.patch_size % 2 == 0:
            raise ValueError(f"patchcore patch_size={config.patch_size} must be odd and >= 1")
        if config.memory_budget_gb is not None and config.memory_budget_gb <= 0:
            raise ValueError(
                f"patchcore memory_budget_gb={config.memory_budget_gb} must be > 0, or None for no bound"
            )
        self.knn_dtype = knn_dtype(config.knn_dtype)
        self.new_reducer()  # a bad ratio or budget fails here, not after the first batch
        self.backbone = freeze(FeatureExtractor(config.backbone, config.layers, config.weights))
        self.frozen = [self.backbone]
        self.feature_dim = min(config.feature_dim, sum(self.backbone.channels))
        # Filled by finalize(); load_weights() resizes it from an artifact.
        self.register_buffer("memory_bank", torch.zeros(0, self.feature_dim))
        self.reducer: StreamingCoreset | None = None
        self.fit_stats: dict = {}  # rows seen, bank size, peak bytes of the last fit

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated patch features at the first layer's grid: [B, feature_dim, h, w]."""
        p = self.config.patch_size
        feats = [F.avg_pool2d(f, p, stride=1, padding=p // 2) for f in self.backbone(images)]
        size = feats[0].shape[-2:]
        feats = [feats[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]
        ]
        emb = torch.cat(feats, dim=1)
        b, c, h, w = emb.shape
        if c > self.feature_dim:
            rows = emb.permute(0, 2, 3, 1).reshape(-1, 1, c)
            emb = (
                F.adaptive_avg_pool1d(rows, self.feature_dim)
                .reshape(b, h, w, -1)
                .permute(0, 3, 1, 2)
            )
        return emb

    def new_reducer(self) -> StreamingCoreset:
        """The bounded-memory coreset builder this config describes."""
        budget = self.config.memory_budget_gb
        return StreamingCoreset(
            self.config.coreset_ratio,
            None if budget is None else int(budget * GIB),
            projection_dim=self.config.projection_dim,
            seed=self.config.seed,
            name="patchcore",
        )

    @torch.no_grad()
    def observe(self, images: torch.Tensor) -> None:
        if self.reducer is None:
            self.reducer = self.new_reducer()
        emb = self.embed(images)
        self.reducer.add(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))

    @torch.no_grad()
    def finalize(self) -> None:
        # A rank with an empty shard still takes part in the merge (and an empty fit says so).
        reducer, self.reducer = self.reducer or self.new_reducer(), None
        # Every rank reduces its shard; rank 0 merges them and all ranks get the same bank.
        bank = gather_and_reduce(reducer)
        self.memory_bank = bank.to(self.memory_bank.device, torch.float32).contiguous()
        self.fit_stats = {
            "rows_seen": reducer.seen,
            "bank_rows": len(bank),
            "peak_bytes": reducer.peak_bytes,
            "budget_bytes": reducer.budget,
            "reductions": reducer.reductions,
            "capped": reducer.capped,
        }

    def products(self) -> torch.dtype:
        """The dtype of the nearest-neighbour products, from `knn_dtype` and the bank's device."""
        return knn_products(self.knn_dtype, self.memory_bank.device)

    def patch_scores(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch distance to the bank [B, h*w], nearest bank index [B, h*w], patches [B, h*w, d]."""
        b, d, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(b, h * w, d)
        dist, idx = knn(patches.reshape(-1, d), self.memory_bank, 1, dtype=self.products())
        return dist.view(b, h * w), idx.view(b, h * w), patches

    def image_scores(
        self, scores: torch.Tensor, nearest: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """Max patch score, re-weighted by how isolated its nearest bank item is (paper, eq. 7)."""
        top, where = scores.max(dim=1)
        k = min(self.config.num_neighbors, len(self.memory_bank))
        if k == 1:
            return top
        rows = torch.arange(len(scores), device=scores.device)
        test = patches[rows, where]  # [B, d]: the most anomalous patch of each image
        anchor = self.memory_bank[nearest[rows, where]]  # its nearest bank item m*
        _, support = knn(anchor, self.memory_bank, k, dtype=self.products())  # m*'s k neighbours
        dists = (test.unsqueeze(1) - self.memory_bank[support]).norm(dim=-1)  # [B, k]
        weight = 1 - torch.softmax(dists, dim=1)[:, 0]
        return weight * top

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.memory_bank.numel() == 0:
            raise RuntimeError("patchcore is not fitted; run fit() or load an artifact")
        emb = self.embed(images)
        b, _, h, w = emb.shape
        scores, nearest, patches = self.patch_scores(emb)
        image = self.image_scores(scores, nearest, patches)
        maps = gaussian_blur(
            upsample(scores.view(b, h, w), images.shape[-2:]), self.config.blur_sigma
        )
        return AnomalyOutput(score=image, map=maps)
