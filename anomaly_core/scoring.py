"""Scoring stages, independent of Ray: read+decode+resize one image, run the model on a batch,
turn raw output into score rows (normalized score, binary mask PNG, 8-bit heatmap PNG)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomaly_core import storage
from anomaly_core.artifact import ModelArtifact
from anomaly_core.data.datasets import prepare_image
from anomaly_core.data.decode import MAX_PIXELS, ImageDecodeError, decode_image
from anomaly_core.evaluate import Calibration


def read_image(
    uri: str,
    size: tuple[int, int],
    *,
    etag: str | None = None,
    prev_etag: str | None = None,
    max_pixels: int = MAX_PIXELS,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """One input row: file facts plus the model-ready image, or `error` set and no image.

    `etag` is the listing's (S3); without one the content hash is the etag. A row whose etag
    equals `prev_etag` (already scored by this model version) comes back `skipped`, undecoded.
    """
    row: dict[str, Any] = {"uri": uri, "etag": etag, "size_bytes": None, "width": None,
                           "height": None, "error": None, "image": None, "skipped": False}
    try:
        data = storage.read_bytes(uri, s3_endpoint=s3_endpoint)
        row["size_bytes"] = len(data)
        row["etag"] = etag or "sha256:" + hashlib.sha256(data).hexdigest()
        if prev_etag is not None and row["etag"] == prev_etag:
            row["skipped"] = True
            return row
        pixels = decode_image(data, uri, max_pixels=max_pixels)
        row["height"], row["width"] = pixels.shape[:2]
        row["image"] = prepare_image(pixels, size).numpy()
    except (storage.StorageError, ImageDecodeError) as exc:
        row["error"] = str(exc)
    except Exception as exc:  # never lose a row to a surprise in a decoder
        row["error"] = f"{uri}: unexpected {type(exc).__name__}: {exc}"
    return row


@torch.no_grad()
def run_model(
    artifact: ModelArtifact, images: list[np.ndarray], *, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores [B] and maps [B,h,w] (float32, model resolution) for prepared images."""
    batch = torch.from_numpy(np.stack(images)).to(device)
    out = artifact.predict(batch)
    return out.score.float().cpu().numpy(), out.map.float().cpu().numpy()


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (height, width)."""
    if amap.shape == tuple(size):
        return amap
    image = Image.fromarray(amap.astype(np.float32))
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR))


def outputs(
    score: float,
    amap: np.ndarray,
    calibration: Calibration,
    size: tuple[int, int],
) -> dict[str, Any]:
    """Score-row fields from one raw output; mask and heatmap at `size` (height, width):
    the image's own size, or the job's --mask-size."""
    amap = resize_map(amap, size)
    normalized = float(calibration.normalize(score))
    return {
        "score": float(score),
        "score_normalized": normalized,
        "is_anomalous": bool(score >= calibration.threshold),
        "mask_png": encode_png((amap >= calibration.pixel_threshold) * 255),
        "heatmap_png": encode_png(np.round(calibration.normalize(amap, pixel=True) * 255)),
    }


def decode_png(data: bytes) -> np.ndarray:
    """A mask or heatmap PNG from a score row back to a uint8 array."""
    return np.asarray(Image.open(io.BytesIO(data)))
