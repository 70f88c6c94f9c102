"""A scoring run's rows against labelled test images (MVTec layout): image AUROC, F1-max and
accuracy from the scores, pixel AUROC and AUPRO from the heatmaps at the size the run wrote them.
The report and the demo both measure here, so their figures are the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from anomaly_core import storage
from anomaly_core.report.load import load_summary, read_pngs, read_run_rows, score_dataset
from anomaly_core.training import metrics


def label_key(uri: str) -> str:
    """category/test/defect/file: the same image scored from a copy elsewhere still matches."""
    return "/".join(uri.replace("\\", "/").split("/")[-4:])


def ground_truth(root: str) -> dict[str, dict[str, Any]]:
    """Labelled test images of an MVTec-layout root, keyed by label_key."""
    from anomaly_core.data.datasets import mvtec_categories, mvtec_records

    truth = {}
    for category in mvtec_categories(root):
        for record in mvtec_records(root, category, "test"):
            truth[label_key(record.uri)] = {"category": category, "defect": record.defect,
                                            "label": record.label, "mask_uri": record.mask_uri}
    return truth


def read_mask(uri: str) -> np.ndarray:
    """A true defect mask, HxW bool."""
    from anomaly_core.data.decode import decode_mask

    return decode_mask(storage.read_bytes(uri), uri)


def labelled_images(run_rows, truth: dict, pngs: dict,
                    true_mask: Callable[[str], np.ndarray] = read_mask) -> list[dict]:
    """The run's labelled, scored images: each with its facts, score, verdict and, where the
    run wrote its heatmap, the heatmap's pixels counted per level against the true mask
    (metrics.level_counts; else None: --heatmaps anomalous writes heatmaps for anomalous
    images only). A mask of another size than the heatmap is resized to it (nearest); a defect
    without a mask counts as normal pixels, as a good image."""
    from PIL import Image

    from anomaly_core.scoring.scorer import decode_png

    out = []
    for row in run_rows.itertuples():
        facts = truth.get(label_key(row.uri))
        if facts is None or row.uri not in pngs or row.score is None or np.isnan(row.score):
            continue
        normal = regions = None
        if pngs[row.uri]["heatmap_png"]:
            heat = decode_png(pngs[row.uri]["heatmap_png"])
            mask = np.zeros(heat.shape, dtype=bool)
            if facts["mask_uri"]:
                mask = true_mask(facts["mask_uri"])
                if mask.shape != heat.shape:
                    resized = Image.fromarray(mask).resize(heat.shape[::-1], Image.NEAREST)
                    mask = np.asarray(resized)
            normal, regions = metrics.level_counts(mask, heat)
        out.append({**facts, "score": row.score, "predicted": bool(row.is_anomalous),
                    "normal": normal, "regions": regions})
    return out


def measure(images: list[dict]) -> dict[str, Any]:
    """Image AUROC, pixel AUROC, AUPRO, image F1-max and the accuracy of the run's verdicts over
    some labelled_images; None for a metric one class alone leaves undefined, and for the pixel
    metrics where some image has no heatmap (`heatmaps` counts those that have one)."""
    labels = np.array([i["label"] for i in images])
    scores = np.array([i["score"] for i in images])
    predicted = np.array([i["predicted"] for i in images])
    with_heat = [i for i in images if i["normal"] is not None]
    out: dict[str, Any] = {"images": len(images), "defective": int(labels.sum()),
                           "heatmaps": len(with_heat),
                           "accuracy": float((predicted == (labels == 1)).mean())}
    pixel = len(with_heat) == len(images)
    if pixel:
        normal = np.sum([i["normal"] for i in images], axis=0)
        regions = np.concatenate([i["regions"] for i in images])
    for key, fn in (("image_auroc", lambda: metrics.image_auroc(labels, scores)),
                    ("pixel_auroc", lambda: metrics.pixel_auroc_of_counts(normal, regions.sum(0))),
                    ("aupro", lambda: metrics.aupro_of_counts(normal, regions)),
                    ("image_f1_max", lambda: metrics.f1_max(labels, scores)[0])):
        if key in ("pixel_auroc", "aupro") and not pixel:
            out[key] = None  # heatmaps of part of the images would bias them
            continue
        try:
            out[key] = fn()
        except ValueError:  # one class only (e.g. no defects of a category were scored)
            out[key] = None
    return out


def metrics_table(images: list[dict]) -> tuple[list[dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """measure per category ("all") and per defect type (with the category's good images), and
    the (labels, scores) per category with both classes, for ROC curves."""
    table, groups = [], {}
    for category in sorted({i["category"] for i in images}):
        mine = [i for i in images if i["category"] == category]
        table.append({"category": category, "defect": "all", **measure(mine)})
        labels = np.array([i["label"] for i in mine])
        if len(set(labels)) == 2:
            groups[category] = (labels, np.array([i["score"] for i in mine]))
        for defect in sorted({i["defect"] for i in mine} - {"good"}):
            chosen = [i for i in mine if i["defect"] in ("good", defect)]
            table.append({"category": category, "defect": defect, **measure(chosen)})
    return table, groups


def evaluate_run(scores: str, labels: str, run_id: str | None = None) -> list[dict]:
    """metrics_table of a finished run under `scores` (the last one when no run_id) against the
    labelled test images under `labels`."""
    truth = ground_truth(labels)
    summary = load_summary(scores, run_id)
    dataset, fs = score_dataset(scores)
    rows = read_run_rows(dataset, summary)
    pngs = read_pngs(fs, rows, {u for u in rows["uri"] if label_key(u) in truth})
    return metrics_table(labelled_images(rows, truth, pngs))[0]
