"""Predict over a dataset, and choose the threshold and normalization on a validation split."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from anomaly_core import metrics
from anomaly_core.detectors.base import Detector

NORMAL_QUANTILE = 0.99


@dataclass
class Calibration:
    """Image/pixel thresholds and the score range that `normalize` maps onto [0, 1]."""

    threshold: float
    pixel_threshold: float
    min: float
    max: float
    method: str

    def normalize(self, values: np.ndarray | float, pixel: bool = False) -> np.ndarray:
        """Threshold -> 0.5, the validation range -> a unit-wide window, clipped to [0, 1]."""
        t = self.pixel_threshold if pixel else self.threshold
        span = max(self.max - self.min, 1e-12)
        return np.clip((np.asarray(values, dtype=np.float64) - t) / span + 0.5, 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict(
    detector: Detector, dataset: Dataset, *, batch_size: int = 32, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Scores [N], maps [N,H,W], labels [N] (-1 unknown) and masks [N,H,W] over a dataset."""
    detector.eval().to(device)
    out: dict[str, list] = {"scores": [], "maps": [], "labels": [], "masks": []}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        result = detector(batch["image"].to(device))
        out["scores"].append(result.score.float().cpu().numpy())
        out["maps"].append(result.map.float().cpu().numpy())
        out["labels"].append(batch["label"].numpy())
        out["masks"].append(batch["mask"].numpy() > 0.5)
    return {k: np.concatenate(v) for k, v in out.items()}


def calibrate(
    scores: np.ndarray,
    maps: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray | None = None,
    *,
    normal_quantile: float = NORMAL_QUANTILE,
) -> tuple[Calibration, dict[str, float]]:
    """Thresholds from labelled validation defects when there are any, else a normal-score quantile.

    Returns the calibration and the validation metrics it could compute.
    """
    labels = np.asarray(labels)
    low, high = float(maps.min()), float(scores.max())
    if (labels == 1).any() and (labels == 0).any():
        val = metrics.evaluate(labels, scores)
        threshold = val["image_f1_threshold"]
        pixel_threshold, method = threshold, "f1_max on labelled validation images"
        if masks is not None and masks[labels == 1].any():
            val.update(metrics.evaluate(labels, scores, masks, maps))
            pixel_threshold = val["pixel_f1_threshold"]
            method = "f1_max on labelled validation images and masks"
        return Calibration(threshold, pixel_threshold, low, high, method), val
    normal = scores[labels != 1]
    if len(normal) == 0:
        raise ValueError("calibration needs held-out normal images or labelled defects")
    threshold = float(np.quantile(normal, normal_quantile))
    method = f"quantile {normal_quantile} of {len(normal)} held-out normal scores"
    return Calibration(threshold, threshold, low, high, method), {
        "normal_score_mean": float(normal.mean()),
        "normal_score_std": float(normal.std()),
    }
