"""Synthetic anomalies for validation without labelled defects: cut-paste patches (Li et al. 2021)
and Perlin-noise blobs filled with foreign texture (DRAEM, Zavrtanik et al. 2021).

Each function returns (image, mask) with the mask exactly where pixels were replaced.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

KINDS = ("cutpaste", "perlin")


def perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2D Perlin gradient noise in about [-1, 1] with `res` periods over the image."""
    h, w = shape
    ry, rx = res
    gy, gx = -(-h // ry) * ry, -(-w // rx) * rx  # padded so cells tile exactly
    angles = rng.uniform(0, 2 * np.pi, (ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, ry, gy, endpoint=False)
    x = np.linspace(0, rx, gx, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[yi[:, None] + dy, xi[None, :] + dx]
        return g[..., 0] * (yf - dy) + g[..., 1] * (xf - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    u, v = fade(xf), fade(yf)
    top = corner(0, 0) * (1 - u) + corner(0, 1) * u
    bottom = corner(1, 0) * (1 - u) + corner(1, 1) * u
    return (np.sqrt(2) * (top * (1 - v) + bottom * v))[:h, :w]


def perlin_anomaly(
    image: np.ndarray, source: np.ndarray, rng: np.random.Generator, *, min_area: float = 0.005
) -> tuple[np.ndarray, np.ndarray]:
    """A Perlin-shaped region of `image` replaced by a blend of `source` texture (DRAEM-style)."""
    h, w = image.shape[:2]
    for _ in range(20):
        scale = 2 ** rng.integers(1, 4)
        noise = perlin((h, w), (int(scale), int(scale)), rng)
        mask = noise > rng.uniform(0.4, 0.6)
        if min_area <= mask.mean() <= 0.3:
            break
    else:  # a near-flat noise field: fall back to a disc so every call yields an anomaly
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.12 * min(h, w)) ** 2
    beta = rng.uniform(0.2, 0.8)  # share of the original kept, as in DRAEM
    out = image.astype(np.float32)
    out[mask] = beta * out[mask] + (1 - beta) * source.astype(np.float32)[mask]
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    changed = (out != image).any(axis=-1)
    return out, mask & changed


def cutpaste_anomaly(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle cut from one place of the image, colour-jittered, pasted at another."""
    h, w = image.shape[:2]
    area = rng.uniform(0.02, 0.08) * h * w
    aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
    ph = int(np.clip(np.sqrt(area * aspect), 4, h - 2))
    pw = int(np.clip(np.sqrt(area / aspect), 4, w - 2))
    y0, x0 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    patch = image[y0 : y0 + ph, x0 : x0 + pw].astype(np.float32)
    patch = patch * rng.uniform(0.75, 1.25, 3) + rng.uniform(-20, 20, 3)
    patch = np.clip(np.round(patch), 0, 255).astype(np.uint8)
    y1, x1 = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    out = image.copy()
    out[y1 : y1 + ph, x1 : x1 + pw] = patch
    mask = np.zeros((h, w), dtype=bool)
    mask[y1 : y1 + ph, x1 : x1 + pw] = True
    return out, mask & (out != image).any(axis=-1)


def make_anomaly(
    image: np.ndarray, kind: str, rng: np.random.Generator, source: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic anomaly of `kind` ("cutpaste" | "perlin") on an HxWx3 uint8 image."""
    if kind == "cutpaste":
        return cutpaste_anomaly(image, rng)
    if kind == "perlin":
        if source is None:  # foreign texture: the image itself, flipped and colour-shifted
            source = np.clip(image[::-1, ::-1].astype(np.int16) + rng.integers(-60, 60, 3), 0, 255)
        return perlin_anomaly(image, source.astype(np.uint8), rng)
    raise ValueError(f"unknown synthetic anomaly {kind!r}; choose one of {KINDS}")


class SyntheticAnomalyDataset(Dataset):
    """Held-out normal images, each also given once with a synthetic anomaly (label 1, its mask).

    Item i < n: the normal image; item n + i: the same image with a seeded anomaly, alternating
    kinds. Same items and masks on every call and every worker.
    """

    def __init__(self, normal: Dataset, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> None:
        self.normal, self.seed, self.kinds = normal, seed, kinds

    def __len__(self) -> int:
        return 2 * len(self.normal)

    def __getitem__(self, index: int) -> dict:
        n = len(self.normal)
        item = dict(self.normal[index % n])
        item["index"] = index
        if index < n:
            item["label"], item["mask"] = 0, torch.zeros_like(item["mask"])
            return item
        rng = np.random.default_rng([self.seed, index])
        pixels = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        source = None
        if n > 1:  # DRAEM pastes foreign texture: another held-out image
            other = self.normal[(index + 1 + int(rng.integers(0, n - 1))) % n]["image"]
            source = (other.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        kind = self.kinds[(index - n) % len(self.kinds)]
        pixels, mask = make_anomaly(pixels, kind, rng, source)
        item["image"] = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
        item["label"], item["mask"] = 1, torch.from_numpy(mask.astype(np.float32))
        return item
