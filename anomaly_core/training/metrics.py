"""Evaluation metrics for anomaly detection: image and pixel AUROC, AUPRO and best F1.

Numpy in, float out. Higher scores mean more anomalous; label/mask 1 (nonzero) means anomalous.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def _binary(labels, name: str) -> np.ndarray:
    """Labels as a bool array, refusing anything but 0/1 (or bool)."""
    arr = np.asarray(labels)
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 or bool; got values {np.unique(arr)[:5]}")
    return arr.astype(bool)


def _scores(scores, name: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} to match the labels")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; fix the detector output before evaluating")
    return arr


def _both_classes(labels: np.ndarray, name: str) -> None:
    if labels.all() or not labels.any():
        kind = "anomalous" if labels.all() else "normal"
        raise ValueError(
            f"{name} are all {kind}; the metric needs both normal and anomalous examples"
        )


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of per-image scores against 0/1 labels."""
    y = _binary(labels, "labels").ravel()
    _both_classes(y, "labels")
    return float(roc_auc_score(y, _scores(scores, "scores", np.shape(labels)).ravel()))


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images: masks [N,H,W] (nonzero = anomalous), maps [N,H,W]."""
    m = np.asarray(masks) != 0
    _both_classes(m, "mask pixels")
    return float(roc_auc_score(m.ravel(), _scores(maps, "maps", m.shape).ravel()))


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by it (MVTec AD).

    Regions are the 8-connected components of each mask; FPR counts all normal pixels of all
    images. Sweeps every distinct score as a threshold, exactly as Bergmann et al.'s reference.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    m = np.asarray(masks) != 0
    if m.ndim != 3:
        raise ValueError(f"masks must be [N, H, W]; got shape {m.shape}")
    scores = _scores(maps, "maps", m.shape)
    _both_classes(m, "mask pixels")

    # One 3-D labelling whose structure connects nothing across images gives every region of
    # every image its own global id, without a Python loop over images.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    regions, n_regions = ndimage.label(m, structure=structure)
    regions = regions.ravel()
    region_size = np.bincount(regions)
    n_normal = region_size[0]

    # Each pixel adds 1/n_normal to FPR (normal) or 1/(n_regions * its region size) to PRO
    # once the threshold falls to its score; cumulative sums in score order trace the curve.
    order = np.argsort(scores.ravel(), kind="stable")[::-1]
    sorted_scores = scores.ravel()[order]
    sorted_regions = regions[order]
    fpr = np.cumsum(sorted_regions == 0) / n_normal
    pro_step = np.where(sorted_regions == 0, 0.0, 1.0 / (n_regions * region_size[sorted_regions]))
    pro = np.cumsum(pro_step)
    # Tied scores are one threshold: keep only the point after the last pixel of each tie.
    last_of_tie = np.append(np.diff(sorted_scores) != 0, True)
    fpr = np.concatenate(([0.0], fpr[last_of_tie]))
    pro = np.concatenate(([0.0], np.minimum(pro[last_of_tie], 1.0)))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a monotone curve from x[0] to x_max, interpolating at x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.sum(0.5 * (y[1:inside] + y[: inside - 1]) * np.diff(x[:inside])))
    if inside < len(x) and x[inside - 1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


LEVELS = 256  # the values of an 8-bit map, as the score rows' heatmap PNGs hold


def level_counts(mask, heat) -> tuple[np.ndarray, np.ndarray]:
    """An 8-bit map's pixels counted per level: the normal ones [LEVELS], and those of each
    8-connected region of the mask [R, LEVELS], as aupro finds regions.

    Summed over images, they give pixel_auroc_of_counts and aupro_of_counts, equal to
    pixel_auroc and aupro of the stacked maps, at each image's own size and without holding
    every pixel of every image at once.
    """
    m = np.asarray(mask) != 0
    h = np.asarray(heat)
    if h.dtype != np.uint8:
        raise ValueError(f"heat must be an 8-bit map (uint8); got {h.dtype}")
    if m.shape != h.shape or m.ndim != 2:
        raise ValueError(f"mask {m.shape} and heat {h.shape} must be one [H, W] shape")
    regions, n_regions = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    normal = np.bincount(h[~m], minlength=LEVELS)
    cells = (regions[m].astype(np.int64) - 1) * LEVELS + h[m]
    per_region = np.bincount(cells, minlength=n_regions * LEVELS).reshape(n_regions, LEVELS)
    return normal, per_region


def _both_counted(normal: float, anomalous: float) -> None:
    if not normal or not anomalous:
        kind = "anomalous" if anomalous else "normal"
        raise ValueError(
            f"mask pixels are all {kind}; the metric needs both normal and anomalous examples"
        )


def pixel_auroc_of_counts(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """pixel_auroc from pixels counted per level: the chance that an anomalous pixel is above a
    normal one, ties counting half (what roc_auc_score computes)."""
    n, a = np.asarray(normal, dtype=np.float64), np.asarray(anomalous, dtype=np.float64)
    _both_counted(n.sum(), a.sum())
    below = np.cumsum(n) - n  # normal pixels strictly below each level
    return float((a * (below + 0.5 * n)).sum() / (a.sum() * n.sum()))


def aupro_of_counts(normal: np.ndarray, regions: np.ndarray, fpr_limit: float = 0.3) -> float:
    """aupro from pixels counted per level (level_counts): one threshold per level."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    normal, regions = np.asarray(normal), np.asarray(regions).reshape(-1, len(normal))
    _both_counted(normal.sum(), regions.sum())
    # From the highest level down: the share of normal pixels and of each region at or above.
    fpr = np.cumsum(normal[::-1]) / normal.sum()
    pro = (np.cumsum(regions[:, ::-1], axis=1) / regions.sum(axis=1, keepdims=True)).mean(axis=0)
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], np.minimum(pro, 1.0)))
    return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over thresholds and the threshold giving it (score >= threshold is anomalous)."""
    y = _binary(labels, "labels").ravel()
    _both_classes(y, "labels")
    s = _scores(scores, "scores", np.shape(labels)).ravel()
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last precision/recall pair has no threshold (it is the "predict nothing" point).
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def evaluate(labels, scores, masks=None, maps=None) -> dict[str, float]:
    """Image metrics, plus pixel metrics when masks and maps are given.

    Keys: image_auroc, image_f1_max, image_f1_threshold, and with masks also pixel_auroc,
    aupro, pixel_f1_max, pixel_f1_threshold. Raises ValueError (never returns NaN) when a
    metric is undefined, e.g. only one class is present.
    """
    if (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps for pixel metrics, or neither")
    f1, threshold = f1_max(labels, scores)
    result = {
        "image_auroc": image_auroc(labels, scores),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
    }
    if masks is not None:
        m = np.asarray(masks) != 0
        if m.shape[:1] != np.shape(labels)[:1]:
            raise ValueError(f"masks hold {m.shape[0]} images but labels {len(labels)}; align them")
        pixel_maps = _scores(maps, "maps", m.shape)
        pixel_f1, pixel_threshold = f1_max(m, pixel_maps)
        result.update(
            pixel_auroc=pixel_auroc(m, pixel_maps),
            aupro=aupro(m, pixel_maps),
            pixel_f1_max=pixel_f1,
            pixel_f1_threshold=pixel_threshold,
        )
    return result
