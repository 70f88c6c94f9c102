"""The validation side of a training run: which images are held out, the objective that picks
the best epoch, and the sets it is measured on (labelled defects, else synthetic ones)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from anomaly_core.data.datasets import ImageRecord

OBJECTIVES = ("image_auroc", "pixel_auroc", "aupro")


def training_records(data: str, *, category: str | None = None, val_fraction: float = 0.2,
                     val_data: str | None = None,
                     seed: int = 0) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, validation) records: the normal images of `data` (an MVTec-layout root with
    `category`, else a plain folder) split, plus the labelled test split of `val_data`."""
    from anomaly_core.data.datasets import folder_records, mvtec_records, split_records

    if category:
        normal = mvtec_records(data, category, "train")
    else:
        normal = folder_records(data)
        normal = [type(r)(r.uri, label=0, defect="good") for r in normal]
    train, val = split_records(normal, val_fraction, seed=seed)
    if val_data:
        if not category:
            raise ValueError("--val-data needs --category (an MVTec-layout test split)")
        val += mvtec_records(val_data, category, "test")
    if not train:
        raise ValueError(f"no training images under {data}")
    if not val:
        raise ValueError("no validation images: raise --val-fraction or pass --val-data")
    return train, val


def parse_objective(text: str) -> dict[str, float]:
    """"image_auroc" or a weighted mix "image_auroc=0.5,pixel_auroc=0.3,aupro=0.2"."""
    weights = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in OBJECTIVES:
            raise ValueError(f"objective {name!r}: choose from {OBJECTIVES} (or a weighted mix)")
        weights[name] = float(weight) if weight else 1.0
    return weights


def validation_hook(val: Dataset, weights: dict[str, float], batch_size: int,
                    device) -> Callable[[object], dict]:
    """Per-epoch validation metrics and the `objective` (higher is better) on labelled images."""
    from anomaly_core.training import metrics
    from anomaly_core.training.evaluate import predict

    def validate(detector) -> dict:
        pred = predict(detector, val, batch_size=batch_size, device=device)
        out = {"val_image_auroc": metrics.image_auroc(pred["labels"], pred["scores"])}
        if "pixel_auroc" in weights:
            out["val_pixel_auroc"] = metrics.pixel_auroc(pred["masks"], pred["maps"])
        if "aupro" in weights:
            out["val_aupro"] = metrics.aupro(pred["masks"], pred["maps"])
        total = sum(w * out[f"val_{k}"] for k, w in weights.items())
        out["objective"] = total / sum(weights.values())
        return out

    return validate


def validation_sets(records: Sequence[ImageRecord], size: tuple[int, int],
                    seed: int = 0) -> tuple[Dataset, Dataset]:
    """(calibration set, objective set): labelled validation images when the user has defects;
    otherwise held-out normal images, plus the same with synthetic anomalies for the objective."""
    from anomaly_core.data.anomalies import SyntheticAnomalyDataset
    from anomaly_core.data.datasets import ImageDataset

    calibration = ImageDataset(list(records), size)
    if any(r.label == 1 for r in records):
        return calibration, calibration
    return calibration, SyntheticAnomalyDataset(calibration, seed=seed)
