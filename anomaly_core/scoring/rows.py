"""The scoring pipeline's CPU stages, batch by batch (dicts of columns, as Ray Data hands them):
read + decode + resize the images, and turn the model's raw outputs into schema rows.

Importing this module does not import torch: the read stage starts in a moment on every worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anomaly_core.model.calibration import Calibration
    from anomaly_core.scoring.runs import RunAttempt

TEXT_COLUMNS = ("uri", "etag", "error")
INT_COLUMNS = ("size_bytes", "width", "height")


def read_images(batch: dict, sizes: dict[str, tuple[int, int]], max_pixels: int,
                keep_jpeg: bool = False, resize: bool = True) -> dict:
    """bytes -> decoded image per row, resized to its product's model input (`sizes`); failures
    keep the row with `error`. With keep_jpeg (--gpu-decode) plain JPEGs stay undecoded, their
    bytes in `jpeg`; without resize (--resize-on-device) images stay at their decoded size.
    Products of different input sizes in one batch, or images of different sizes, give a
    ragged column."""
    from anomaly_core import storage
    from anomaly_core.data.decode import read_image  # torch-free

    retried = sum(storage.retries().values())
    shapes = [tuple(sizes[p]) for p in batch["product"]]
    rows = [
        read_image(str(uri), size, etag=etag or None, prev_etag=prev or None,
                   max_pixels=max_pixels, keep_jpeg=keep_jpeg, resize=resize)
        for uri, etag, prev, size in zip(batch["uri"], batch["etag"], batch["prev_etag"], shapes)
    ]
    # Ray turns an all-None column into floats; carry "" and -1 for missing, nulls again in rows.
    out = {k: [r[k] or "" for r in rows] for k in TEXT_COLUMNS}
    out.update({k: [r[k] or -1 for r in rows] for k in INT_COLUMNS})
    out["product"] = list(batch["product"])
    out["skipped"] = np.array([r["skipped"] for r in rows])
    out["image"] = stacked([np.zeros((3, *size), dtype=np.uint8) if r["image"] is None
                            else r["image"] for r, size in zip(rows, shapes)])
    out["jpeg"] = [r["jpeg"] or b"" for r in rows]
    # S3 calls this batch retried, on its first row (the row stage sums them)
    out["storage_retries"] = np.zeros(len(rows), dtype=np.int64)
    out["storage_retries"][:1] = sum(storage.retries().values()) - retried
    return out


def stacked(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One array when every row's has the same shape, else the list (Ray Data keeps it as a
    variable-shaped tensor column)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    return list(arrays)


def output_size(batch: dict, i: int, mask_size) -> tuple[int, int]:
    """(height, width) of row i's mask and heatmap: --mask-size, else the image's own size."""
    return tuple(mask_size) if mask_size else (int(batch["height"][i]), int(batch["width"][i]))


def make_rows(batch: dict, run: RunAttempt, calibrations: dict[str, Calibration],
              mask_size, heatmaps: str = "anomalous") -> list[dict[str, Any]]:
    """Raw outputs (maps, or masks and heatmaps rendered by the model stage) -> schema rows: PNG
    mask, heatmap PNG where `heatmaps` (all, anomalous, none) asks for one, normalized score
    (by the row's product's calibration); skipped images get none."""
    import torch

    from anomaly_core.scoring.schema import utc_now
    from anomaly_core.scoring.scorer import outputs, render_maps, wants_heatmap

    now, rows = utc_now(), []
    for i in range(len(batch["uri"])):
        if batch["skipped"][i]:
            continue
        row = {k: batch[k][i] for k in (*TEXT_COLUMNS, *INT_COLUMNS)}
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        row = {k: None if v in ("", -1) else v for k, v in row.items()}
        row.update(model_version=run.model(batch["product"][i]).model_version, scored_at=now,
                   run_id=run.run_id)
        if row["error"] is None:
            size, calibration = output_size(batch, i, mask_size), calibrations[batch["product"][i]]
            score = float(batch["raw_score"][i])
            heat_wanted = wants_heatmap(heatmaps, score >= calibration.threshold)
            if "raw_map" in batch:
                # A copy: Ray hands the batch over read-only, which torch.from_numpy warns of.
                raw = torch.tensor(batch["raw_map"][i][None])
                (mask,), (heat,) = render_maps(raw, [size], calibration, [heat_wanted],
                                               packed=True)
            else:  # rendered by the model actor (--render-on-device)
                mask = np.frombuffer(batch["mask_bits"][i], np.uint8).reshape(size[0], -1)
                heat = (np.frombuffer(batch["heat_u8"][i], np.uint8).reshape(size)
                        if heat_wanted else None)
            row.update(outputs(score, mask, heat, calibration, mask_width=size[1]))
        rows.append(row)
    return rows


def write_part(batch: dict, run: RunAttempt, calibrations: dict[str, Calibration],
               mask_size, heatmaps: str = "anomalous") -> dict:
    """The row stage: raw outputs -> schema rows -> a part file per product in the attempt's
    staging folder (the driver publishes them); returns the counts, the staged files (one per
    line) and the model nodes."""
    from anomaly_core import storage
    from anomaly_core.scoring.runs import stage_part

    retried = sum(storage.retries().values())
    rows = make_rows(batch, run, calibrations, mask_size, heatmaps)
    products = [p for p, s in zip(batch["product"], batch["skipped"]) if not s]
    groups: dict[str, list] = {}
    for product, row in zip(products, rows, strict=True):
        groups.setdefault(product, []).append(row)
    staged = [stage_part(run, group, product) for product, group in groups.items()]
    errors = sum(r["error"] is not None for r in rows)
    retried = sum(storage.retries().values()) - retried + int(np.sum(batch["storage_retries"]))
    return {"images": [len(batch["uri"])], "rows": [len(rows)], "errors": [errors],
            "storage_retries": [retried],
            "staged": ["\n".join(staged)],
            "model_node": [",".join(sorted(set(map(str, batch["model_node"]))))],
            **{k: [int(np.sum(batch[k]))] for k in ("model_loads", "model_evictions")}}
