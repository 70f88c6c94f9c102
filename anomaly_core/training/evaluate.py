"""Predict over a dataset, and choose the threshold and normalization on a validation split."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from anomaly_core.detectors.base import Detector
from anomaly_core.model.calibration import Calibration
from anomaly_core.training import metrics

NORMAL_QUANTILE = 0.99
# Pixels: a normal image has tens of thousands, so the pixel threshold is a far higher quantile
# of the held-out normal pixels; it marks about 0.1 % of a normal image's pixels, which leaves
# room below 1 % for the spread between held-out and new normal images.
PIXEL_QUANTILE = 0.999
PIXEL_SAMPLE = 8_000_000  # held-out pixels the pixel quantiles are taken from, at most
REFERENCE_SCORES = 1000


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
    pixel_quantile: float = PIXEL_QUANTILE,
) -> tuple[Calibration, dict[str, float]]:
    """Calibrate image scores and map pixels each from their own values on a validation split.

    Image threshold: F1-max on labelled validation images when there are defects among them,
    else the `normal_quantile` of held-out normal scores. Pixel threshold: F1-max on labelled
    masks when there are some, else the `pixel_quantile` of held-out normal map pixels. The
    image score need not be the map's maximum (a CLS distance, a re-weighted or a pre-blur
    score), so the two quantities are never mixed.

    Returns the calibration and the validation metrics it could compute.
    """
    labels = np.asarray(labels)
    normal = labels != 1
    if not normal.any():
        raise ValueError("calibration needs held-out normal images; the validation split has only defects")
    normal_scores, normal_maps = scores[normal], maps[normal]
    pixels = normal_maps.reshape(-1)
    if len(pixels) > PIXEL_SAMPLE:  # every k-th pixel keeps the quantiles cheap on big splits
        pixels = pixels[:: -(-len(pixels) // PIXEL_SAMPLE)]
    n = int(normal.sum())
    threshold = float(np.quantile(normal_scores, normal_quantile))
    method = f"quantile {normal_quantile} of {n} held-out normal scores"
    pixel_low, pixel_threshold = (float(v) for v in np.quantile(pixels, [0.01, pixel_quantile]))
    pixel_method = f"quantile {pixel_quantile} of the map pixels of {n} held-out normal images"
    val: dict[str, float] = {}
    if (labels == 1).any():
        val = metrics.evaluate(labels, scores)
        threshold, method = val["image_f1_threshold"], "f1_max on labelled validation images"
        if masks is not None and masks[labels == 1].any():
            val.update(metrics.evaluate(labels, scores, masks, maps))
            pixel_threshold = val["pixel_f1_threshold"]
            pixel_method = "f1_max on labelled validation masks"
    # Windows: from the lowest normal value to the highest validation value, and at least as far
    # above the threshold as the low end is below it, so that normal values fill [0, 0.5] and
    # higher ones keep room above 0.5 when the split has no defects.
    low = float(normal_scores.min())
    calibration = Calibration(
        threshold=threshold, pixel_threshold=pixel_threshold,
        min=low, max=max(float(scores.max()), 2 * threshold - low), method=method,
        pixel_min=pixel_low, pixel_max=max(float(maps.max()), 2 * pixel_threshold - pixel_low),
        pixel_method=pixel_method, normal_scores=reference_scores(normal_scores),
    )
    val.update({
        "normal_score_mean": float(normal_scores.mean()),
        "normal_score_std": float(normal_scores.std()),
        # In-sample: the share of held-out normal pixels the pixel threshold marks.
        "normal_pixels_marked": float((normal_maps >= pixel_threshold).mean()),
    })
    return calibration, val


def reference_scores(scores: np.ndarray, n: int = REFERENCE_SCORES) -> list[float]:
    """The scores themselves when few, else n evenly spaced quantiles: a compact distribution."""
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if len(values) > n:
        values = np.quantile(values, np.linspace(0, 1, n))
    return [float(v) for v in values]
