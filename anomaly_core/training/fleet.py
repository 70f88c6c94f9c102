"""A plant's products trained together: which products, what each one's data and configuration
are worth as a fingerprint (a rerun trains only what changed), and the closing table."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from anomaly_core import storage

# Training flags that change what a fit learns (not how fast): part of the fingerprint.
LEARNING_FLAGS = ("val_fraction", "val_data", "objective", "epochs", "batch_size", "lr", "seed",
                  "precision", "tile", "tiled_size", "tile_stride", "tile_positions")


def products(data: str, categories: str) -> list[str]:
    """`all` (every <category>/train/good under `data`) or a comma-separated list."""
    from anomaly_core.data.datasets import mvtec_categories

    if categories == "all":
        return mvtec_categories(data)
    names = [c.strip() for c in categories.split(",") if c.strip()]
    if not names:
        raise ValueError("--categories: give `all` or a comma-separated list of categories")
    return names


def fingerprint(data: str, product: str, detector: str, options: dict[str, Any],
                flags: dict[str, Any]) -> str:
    """sha256 of the product's files (every key with its size and ETag, or its local size)
    under <data>/<product>, the detector, its options and the learning flags."""
    files = [(uri, size, etag) for page in storage.list_objects(storage.join(data, product))
             for uri, size, etag in page]
    body = json.dumps({"files": sorted(files), "detector": detector, "options": options,
                       "flags": {k: flags.get(k) for k in LEARNING_FLAGS}},
                      sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


@dataclass
class ProductResult:
    """One product's line of the fleet table."""

    product: str
    status: str = "pending"  # trained, up to date, failed
    detector: str = ""
    image_auroc: float | None = None  # on its validation split
    pixel_auroc: float | None = None
    wall_s: float | None = None
    version: int | None = None  # the registered version (the one up to date, or the new one)
    reason: str | None = None  # why it failed
    artifact: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def table(results: list[ProductResult]) -> str:
    """The fleet job's closing table, a product a line."""
    columns = ("product", "detector", "status", "image_auroc", "pixel_auroc", "wall_s", "version")

    def cell(r: ProductResult, c: str) -> str:
        value = getattr(r, c)
        if isinstance(value, float):
            return f"{value:.1f}" if c == "wall_s" else f"{value:.3f}"
        return "" if value is None else str(value)

    rows = [[cell(r, c) for c in columns] for r in results]
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines += [f"{r.product}: {r.reason}" for r in results if r.reason]
    return "\n".join(lines)
