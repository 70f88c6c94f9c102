"""The report's pictures as data: URIs: thumbnails with their heatmap and contours, and the score,
drift, per-day and ROC/PR plots. Figures are made without pyplot: no window, no global state."""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.figure import Figure


def _png(fig, tight: bool = True) -> str:
    """A matplotlib figure as a data: URI; `tight` trims its margins."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight" if tight else None)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _resized(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """An 8-bit or boolean array resized to (height, width)."""
    from PIL import Image

    image = Image.fromarray(array.astype(np.uint8) * (255 if array.dtype == bool else 1))
    out = np.asarray(image.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR))
    return out > 127 if array.dtype == bool else out


def thumbnail(uri: str, pngs: dict | None, truth_mask: np.ndarray | None,
              side: int) -> tuple[str, str | None]:
    """The image with its heatmap (jet, translucent), the predicted mask's contour (white) and the
    true defect's contour (green) over it; a data: URI and a note when something is missing."""
    from anomaly_core.data.decode import load_image
    from anomaly_core.scoring.scorer import decode_png

    heat = decode_png(pngs["heatmap_png"]) if pngs and pngs["heatmap_png"] else None
    mask = decode_png(pngs["mask_png"]) > 0 if pngs and pngs["mask_png"] else None
    note = None
    try:
        image = load_image(uri)
    except Exception as exc:  # moved or deleted since scoring: show the maps alone
        image, note = None, f"image not readable now ({type(exc).__name__})"
    shape = image.shape[:2] if image is not None else heat.shape if heat is not None else (side, side)
    scale = side / max(shape)
    size = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
    fig = Figure(figsize=(size[1] / 100, size[0] / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    if image is not None:
        ax.imshow(_resized(image, size))
    else:
        ax.imshow(np.zeros(size), cmap="gray")
    if heat is not None:
        # Below a quarter of the way to the pixel threshold stays clear, so the part shows.
        heat = np.ma.masked_less(_resized(heat, size) / 255.0, 0.125)
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    for outline, color in ((mask, "white"), (truth_mask, "lime")):
        if outline is not None and outline.any():
            ax.contour(_resized(outline, size, nearest=True), levels=[0.5], colors=color,
                       linewidths=1.2)
    return _png(fig, tight=False), note  # the image fills the figure: no margins to trim


def histogram(scores: np.ndarray, threshold: float | None) -> str:
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.subplots()
    ax.hist(scores, bins=min(60, max(10, len(scores) // 5)), color="#4477aa")
    if threshold is not None:
        ax.axvline(threshold, color="#cc3311", linestyle="--", label=f"threshold {threshold:.4g}")
        ax.legend()
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    return _png(fig)


def drift_plot(scores: np.ndarray, reference: np.ndarray, threshold: float | None) -> str:
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.concatenate([scores, reference]), bins=40)
    ax.hist(reference, bins=bins, density=True, alpha=0.5, color="#228833",
            label=f"validation (normal, {len(reference)})")
    ax.hist(scores, bins=bins, density=True, alpha=0.5, color="#4477aa",
            label=f"this run ({len(scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="#cc3311", linestyle="--", label="threshold")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("density")
    ax.legend()
    return _png(fig)


def days_plot(days) -> str:
    fig = Figure(figsize=(6.4, 3.2))
    ax = fig.subplots()
    ax.bar(days.index, days["scored"], color="#4477aa", label="scored")
    ax.set_ylabel("images scored")
    ax.tick_params(axis="x", rotation=45)
    rate = ax.twinx()
    rate.plot(days.index, 100 * days["anomaly_rate"], color="#cc3311", marker="o")
    rate.set_ylabel("anomalous, %")
    return _png(fig)


def curves(groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """ROC and precision-recall curves, one line per category."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fig = Figure(figsize=(9, 3.6))
    roc, pr = fig.subplots(1, 2)
    for name, (labels, scores) in groups.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        precision, recall, _ = precision_recall_curve(labels, scores)
        roc.plot(fpr, tpr, label=name)
        pr.plot(recall, precision, label=name)
    roc.plot([0, 1], [0, 1], color="gray", linestyle=":")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (images)")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall (images)")
    roc.legend(fontsize=8)
    return _png(fig)
