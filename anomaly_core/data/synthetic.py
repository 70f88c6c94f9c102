"""Procedural MVTec-AD-style data set: textures and posed objects with pixel-masked defects.

Deterministic (the same seed gives the same PNG bytes) and made with numpy and Pillow only,
so tests and benchmarks have realistic-looking data without a download.

High resolution: sizes above DIRECT_MAX_SIZE (up to MAX_SIZE) render the scene at
_LARGE_BASE pixels, upsample it and add full-resolution grain and sensor noise, so a 2,048 px
image takes a fraction of a second. With ``defect_px=(lo, hi)`` a defect is drawn in a small
window and is lo..hi pixels across whatever the image size, small enough to vanish when a
4k image is shrunk to 256 px (the case tiled training and scoring is for).
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: dict[str, str] = {
    "carpet": "texture",
    "wood": "texture",
    "capsule": "object",
    "metal_nut": "object",
}
DEFECTS: tuple[str, ...] = ("scratch", "crack", "spot", "stain")

MIN_SIZE = 32
MAX_SIZE = 8192
# Above this side the scene is rendered at _LARGE_BASE and upsampled (see _render_large); at or
# below it every pixel is rendered directly, as always.
DIRECT_MAX_SIZE = 1024
_LARGE_BASE = 512
# Defect area as a fraction of the image; a draw outside these bounds is redrawn.
MIN_DEFECT_AREA = 0.004
MAX_DEFECT_AREA = 0.08
# Blending weights below this are dropped, so the mask is exactly where pixels may change
# and its edge is where a human annotator would draw it.
_ALPHA_FLOOR = 0.2
_SUPERSAMPLE = 4


# ---------------------------------------------------------------- noise and geometry


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float64."""
    c = np.arange(size, dtype=np.float64) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    return y, x


def _noise(
    rng: np.random.Generator,
    size: int,
    sigma: float,
    sigma_across: float | None = None,
    angle: float = 0.0,
) -> np.ndarray:
    """Gaussian-filtered white noise (zero mean, unit std); anisotropic when sigma_across is set.

    With sigma_across, `sigma` is the correlation length along direction `angle` (radians
    from the x axis), which makes fibres and grain. Filtering is done in Fourier space
    because it costs the same for any sigma.
    """
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    if sigma_across is None:
        gain = np.exp(-2 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    else:
        f_along = fx * np.cos(angle) + fy * np.sin(angle)
        f_across = -fx * np.sin(angle) + fy * np.cos(angle)
        gain = np.exp(-2 * np.pi**2 * (sigma**2 * f_along**2 + sigma_across**2 * f_across**2))
    out = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(size, size))
    out -= out.mean()
    return out / (out.std() + 1e-12)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D array (periodic edges, fine for content away from the border)."""
    h, w = a.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    gain = np.exp(-2 * np.pi**2 * sigma**2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(a) * gain, s=(h, w))


def _rotated(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame centred at (cx, cy) and turned by `angle`."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    return dx * c + dy * s, -dx * s + dy * c


def _lerp(a: Sequence[float], b: Sequence[float], t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours, HxWx3."""
    a_, b_ = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a_ + (b_ - a_) * t[..., None]


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)-square (outside the array counts as False), numpy only.

    A pixel survives when its whole window is True: a summed-area table counts the window in
    O(1) per pixel, so the cost does not grow with the radius.
    """
    if radius <= 0:
        return mask.copy()
    k = 2 * radius + 1
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
    # Pad so every window reads inside the table; padding cells add nothing (False).
    t = np.pad(table, ((radius, radius), (radius, radius)), mode="edge")
    count = t[k:, k:] - t[:-k, k:] - t[k:, :-k] + t[:-k, :-k]
    return count == k * k


# ---------------------------------------------------------------- normal samples


def _photograph(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the camera's nuisances (exposure, uneven light, white balance, sensor noise)."""
    size = scene.shape[0]
    y, x = _grid(size)
    exposure = rng.uniform(0.86, 1.14)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)) / size
    light = exposure * (1 + rng.uniform(0.0, 0.22) * ramp)
    white_balance = 1 + rng.normal(0, 0.015, 3)
    out = scene * light[..., None] * white_balance
    out += rng.normal(0, rng.uniform(1.5, 4.0), out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _carpet(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Basket weave of fuzzy yarn: blocks of threads alternating direction."""
    y, x = _grid(size)
    block = size / 9 * rng.uniform(0.95, 1.05)
    u, v = _rotated(x, y, *rng.uniform(0, block, 2), rng.uniform(-0.08, 0.08))
    # Yarn wanders a little, so the weave is not a perfect lattice.
    u = u + 0.6 * _noise(rng, size, size / 12)
    v = v + 0.6 * _noise(rng, size, size / 12)
    checker = (np.floor(u / block) + np.floor(v / block)) % 2
    thread = block / 3
    across_h = 0.5 - 0.5 * np.cos(2 * np.pi * v / thread)
    across_v = 0.5 - 0.5 * np.cos(2 * np.pi * u / thread)
    bulge_h = np.sin(np.pi * ((u / block) % 1)) ** 0.5
    bulge_v = np.sin(np.pi * ((v / block) % 1)) ** 0.5
    weave = np.where(checker == 0, across_h * bulge_h, across_v * bulge_v)
    fuzz = np.where(
        checker == 0,
        _noise(rng, size, 2.5, 0.5, angle=0.0),
        _noise(rng, size, 2.5, 0.5, angle=np.pi / 2),
    )
    shade = 0.66 + 0.24 * weave + 0.07 * fuzz + 0.04 * _noise(rng, size, size / 10)
    dye = np.array([138.0, 130.0, 122.0]) * (1 + rng.normal(0, 0.015, 3))
    return dye * shade[..., None], np.ones((size, size), bool)


def _wood(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Planed board: growth rings warped by slow noise, with fine fibres along the grain."""
    y, x = _grid(size)
    grain = np.pi / 2 + rng.uniform(-0.12, 0.12)
    across, _ = _rotated(x, y, 0.0, 0.0, grain - np.pi / 2)
    bends = _noise(rng, size, size / 4)
    streaks = _noise(rng, size, size / 3, size / 25, grain)
    warp = 0.045 * bends + 0.02 * streaks
    period = size / 7 * rng.uniform(0.9, 1.1)
    phase = 2 * np.pi * (across + size * warp) / period + rng.uniform(0, 2 * np.pi)
    # Cubed, so the dark latewood bands are narrower than the light earlywood.
    rings = (0.5 + 0.5 * np.sin(phase)) ** 3
    fibres = _noise(rng, size, size / 6, 0.7, grain)
    tone = np.clip(0.6 * rings + 0.14 * fibres + 0.08 * _noise(rng, size, size / 8) + 0.15, 0, 1)
    light, dark = (198, 162, 120), (138, 98, 64)
    return _lerp(light, dark, tone), np.ones((size, size), bool)


def _shadowed_background(
    rng: np.random.Generator, size: int, colour: Sequence[float], cover: np.ndarray, depth: float
) -> np.ndarray:
    """A slightly mottled backdrop with the soft shadow of `cover` cast down-right."""
    mottle = 1 + 0.035 * _noise(rng, size, size / 8) + 0.02 * _noise(rng, size, 1.5)
    shift = max(1, round(size / 50))
    shadow = _blur(np.roll(cover, (shift, shift), axis=(0, 1)), size / 40)
    light = mottle * (1 - depth * np.clip(shadow, 0, 1))
    return np.asarray(colour, np.float64) * light[..., None]


def _capsule(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-tone gelatin capsule lying on a tray, its position and angle varying."""
    y, x = _grid(size)
    cx, cy = size / 2 + np.clip(rng.normal(0, 0.03 * size, 2), -0.06 * size, 0.06 * size)
    a, b = _rotated(x, y, cx, cy, rng.uniform(-0.25, 0.25))
    radius = 0.15 * size * rng.uniform(0.97, 1.03)
    core = 0.31 * size * rng.uniform(0.97, 1.03) - radius
    da = np.maximum(np.abs(a) - core, 0.0)
    dist_axis = np.sqrt(da**2 + b**2)
    cover = np.clip(0.5 - (dist_axis - radius), 0, 1)
    # Shade as a 3-D capsule: normal from the distance to the axis, light from upper left.
    nz = np.sqrt(np.clip(1 - (dist_axis / radius) ** 2, 0, 1))
    normal = np.stack([np.sign(a) * da / radius, b / radius, nz], -1)
    half = np.array([-0.25, -0.35, 1.0])
    half /= np.linalg.norm(half)
    lambert = 0.45 + 0.55 * nz
    spec = np.clip(normal @ half, 0, 1) ** 30
    body = _lerp((168, 62, 40), (222, 210, 182), np.clip(a + 0.5, 0, 1))
    seam = 1 - 0.25 * np.clip(1.2 - np.abs(a), 0, 1)
    # A printed dosage mark on the cream half, which moves with the pose like the real print.
    mark = (np.abs(b) < 0.28 * radius) & (np.abs(a - 0.55 * (core + radius)) < 0.3 * radius)
    mark &= ((a - 0.55 * (core + radius)) / (0.12 * radius)) % 2 < 1.2
    body = body * np.where(mark, 0.45, 1.0)[..., None]
    body = body * (lambert * seam)[..., None] + 150 * spec[..., None]
    back = _shadowed_background(rng, size, (62, 68, 76), cover, 0.45)
    image = back * (1 - cover[..., None]) + body * cover[..., None]
    return image, dist_axis < radius - max(1.5, size / 64)


def _metal_nut(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Turned hex nut seen from above, with a threaded hole, at any angle."""
    y, x = _grid(size)
    cx, cy = size / 2 + np.clip(rng.normal(0, 0.035 * size, 2), -0.07 * size, 0.07 * size)
    turn = rng.uniform(0, np.pi / 3)
    apothem = 0.33 * size * rng.uniform(0.98, 1.02)
    hole = 0.13 * size
    d_hex = -np.inf
    for k in range(6):
        u, _ = _rotated(x, y, cx, cy, turn + k * np.pi / 3)
        d_hex = np.maximum(d_hex, u - apothem)
    r = np.hypot(x - cx, y - cy)
    phi = np.arctan2(y - cy, x - cx)
    cover = np.clip(0.5 - d_hex, 0, 1) * np.clip(0.5 + (r - hole), 0, 1)
    light = rng.uniform(0, 2 * np.pi)
    # Turning marks: noise that depends only on the radius, sampled on a fine 1-D grid.
    rings_1d = _noise(rng, size, 0.8)[0]
    turning = np.interp(r * 2.0, np.arange(size) * 1.0, rings_1d, period=size)
    face = 0.8 + 0.05 * turning + 0.05 * np.cos(phi - light) + 0.03 * _noise(rng, size, size / 10)
    chamfer = 0.68 + 0.22 * np.cos(phi - light - np.pi)
    thread = 0.45 + 0.12 * np.sin(2 * np.pi * r / max(2.0, size / 40))
    in_chamfer = np.clip((r - 0.93 * apothem) / 1.0 + 0.5, 0, 1)
    in_thread = np.clip((1.28 * hole - r) / 1.0 + 0.5, 0, 1)
    shade = face * (1 - in_chamfer) + chamfer * in_chamfer
    shade = shade * (1 - in_thread) + thread * in_thread
    steel = np.array([172.0, 174.0, 180.0])
    back = _shadowed_background(rng, size, (40, 42, 46), cover, 0.5)
    image = back * (1 - cover[..., None]) + steel * shade[..., None] * cover[..., None]
    margin = max(1.5, size / 64)
    return image, (d_hex < -margin) & (r > 1.28 * hole + margin)


_RENDER = {"carpet": _carpet, "wood": _wood, "capsule": _capsule, "metal_nut": _metal_nut}


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(
            f"unknown synthetic category {category!r}; choose from {', '.join(CATEGORIES)}"
        )


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"size={size} is too small to draw defects; use at least {MIN_SIZE}")
    if size > MAX_SIZE:
        raise ValueError(f"size={size} is over the largest supported side of {MAX_SIZE} pixels")


def _render(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A normal photograph and the region where a defect may go (the object, or everything)."""
    _check_category(category)
    _check_size(size)
    if size > DIRECT_MAX_SIZE:
        return _render_large(category, rng, size)
    scene, region = _RENDER[category](rng, size)
    return _photograph(scene, rng), region


# ---------------------------------------------------------------- high resolution

# Rows per block when drawing sensor noise, so a large image needs no full-size scratch arrays.
_NOISE_ROWS = 256
# Standard deviation of the sum of two independent uniform bytes (0..255 each).
_TWO_BYTES_STD = float(np.sqrt(2 * (256**2 - 1) / 12))
# Relative strength of the full-resolution grain, and the grain bytes' measured std.
_GRAIN_AMOUNT = 0.035
_GRAIN_STD = 46.2


def _grain(rng: np.random.Generator, size: int) -> np.ndarray:
    """Uniform noise bytes correlated over ~2 px (bilinear upsampling by two), size x size
    uint8 around 127.5; _GRAIN_STD is its standard deviation."""
    half = (size + 1) // 2
    white = np.frombuffer(rng.bytes(half * half), np.uint8).reshape(half, half)
    return np.asarray(Image.fromarray(white, "L").resize((size, size), Image.Resampling.BILINEAR))


def _render_large(
    category: str, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A normal photograph at a high resolution, fast: the scene is drawn at _LARGE_BASE
    pixels, upsampled bicubically and given full-resolution grain (material texture finer than
    the base grid) under the camera's light, white balance and sensor noise."""
    scene, region = _RENDER[category](rng, _LARGE_BASE)
    base = Image.fromarray(np.clip(np.rint(scene), 0, 255).astype(np.uint8), "RGB")
    upsampled = np.asarray(base.resize((size, size), Image.Resampling.BICUBIC))
    grain = _grain(rng, size)
    region_image = Image.fromarray(region.astype(np.uint8) * 255, "L")
    region = np.asarray(region_image.resize((size, size), Image.Resampling.NEAREST)) > 127
    return _photograph_large(upsampled, grain, rng), region


def _photograph_large(
    scene: np.ndarray, grain: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """_photograph for a large uint8 scene shaded by `grain` (from _grain): the same nuisances,
    with a separable light ramp and triangular sensor noise from random bytes, by row blocks."""
    size = scene.shape[0]
    exposure = rng.uniform(0.86, 1.14)
    angle = rng.uniform(0, 2 * np.pi)
    tilt = rng.uniform(0.0, 0.22)
    white_balance = (1 + rng.normal(0, 0.015, 3)).astype(np.float32)
    sigma = rng.uniform(1.5, 4.0)
    c = (np.arange(size, dtype=np.float32) + 0.5 - size / 2) / size
    across_x = np.float32(tilt * np.cos(angle)) * c
    across_y = np.float32(tilt * np.sin(angle)) * c
    out = np.empty(scene.shape, np.uint8)
    for top in range(0, size, _NOISE_ROWS):
        rows = slice(top, min(size, top + _NOISE_ROWS))
        light = np.float32(exposure) * (1 + across_y[rows, None] + across_x[None, :])
        shade = grain[rows].astype(np.float32)
        shade -= 127.5
        shade *= np.float32(_GRAIN_AMOUNT / _GRAIN_STD)
        shade += 1
        light *= shade
        block = scene[rows].astype(np.float32)
        block *= light[..., None]
        block *= white_balance
        pairs = np.frombuffer(rng.bytes(2 * block.size), np.uint8).reshape(2, *block.shape)
        noise = np.add(pairs[0], pairs[1], dtype=np.float32)
        noise -= 255.0
        noise *= np.float32(sigma / _TWO_BYTES_STD)
        block += noise
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        out[rows] = block
    return out


def make_image(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One normal sample of `category`, HxWx3 uint8."""
    return _render(category, rng, size)[0]


# ---------------------------------------------------------------- defects


def object_region(image: np.ndarray) -> np.ndarray:
    """Where an object stands out from the backdrop: far in colour from the border's median."""
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    dist = np.abs(img - np.median(border, axis=0)).sum(-1)
    # Blurring first keeps sensor noise and the cast shadow out of the region.
    region = _blur(dist, 1.0) > 65
    return _erode(region, max(1, round(image.shape[0] / 64)))


def _stroke_alpha(size: int, strokes: list[np.ndarray], width: float) -> np.ndarray:
    """Anti-aliased coverage of polylines (points in pixels), drawn supersampled."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    w = max(1, round(width * s))
    for pts in strokes:
        xy = [(float(px * s), float(py * s)) for px, py in pts]
        draw.line(xy, fill=255, width=w, joint="curve")
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float64) / 255.0


def _walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, length: float, step: float,
    bend: float, jitter: float,
) -> tuple[np.ndarray, np.ndarray]:
    """A path turning by a steady `bend` plus random `jitter` per step: (points, headings)."""
    n = max(2, int(length / step))
    turns = bend + jitter * rng.standard_normal(n)
    headings = heading + np.cumsum(turns)
    steps = step * np.stack([np.cos(headings), np.sin(headings)], -1)
    points = start + np.concatenate([[[0.0, 0.0]], np.cumsum(steps, 0)])
    return points, headings


def _pick_point(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random pixel centre (x, y) inside `region`."""
    ys, xs = np.nonzero(region)
    i = rng.integers(len(ys))
    return np.array([xs[i] + 0.5, ys[i] + 0.5])


def _scratch_alpha(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    """A thin, gently curved line."""
    start = _pick_point(rng, region)
    length = size * rng.uniform(0.25, 0.45)
    pts, _ = _walk(rng, start, rng.uniform(0, 2 * np.pi), length, size / 64,
                   rng.normal(0, 0.04), 0.02)
    # Centre the stroke on the chosen point so it stays on small objects.
    pts = pts - (pts.mean(0) - start)
    return _stroke_alpha(size, [pts], size / 64 * rng.uniform(1.5, 2.2))


def _crack_alpha(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    """A jagged line with one or two branches."""
    start = _pick_point(rng, region)
    length = size * rng.uniform(0.25, 0.4)
    pts, headings = _walk(rng, start, rng.uniform(0, 2 * np.pi), length, size / 48, 0.0, 0.45)
    shift = pts.mean(0) - start
    strokes = [pts - shift]
    for _ in range(rng.integers(1, 3)):
        i = rng.integers(1, len(pts) - 1)
        side = rng.choice([-1.0, 1.0])
        branch, _ = _walk(rng, pts[i] - shift, headings[i - 1] + side * rng.uniform(0.5, 1.1),
                          length * rng.uniform(0.25, 0.5), size / 48, 0.0, 0.45)
        strokes.append(branch)
    return _stroke_alpha(size, strokes, size / 64 * rng.uniform(1.2, 1.6))


def _blob_alpha(
    rng: np.random.Generator, size: int, region: np.ndarray, radius: float, softness: float
) -> np.ndarray:
    """An irregular blob: a radial falloff whose outline is bent by smooth noise."""
    cx, cy = _pick_point(rng, region)
    y, x = _grid(size)
    stretch = rng.uniform(0.7, 1.0)
    u, v = _rotated(x, y, cx, cy, rng.uniform(0, np.pi))
    r = np.hypot(u, v / stretch) / radius
    field = 1 - r + 0.35 * _noise(rng, size, radius / 2.5)
    return np.clip(field / softness, 0, 1)


def _spot_alpha(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    """A compact blob with a fairly sharp edge."""
    return _blob_alpha(rng, size, region, size * rng.uniform(0.07, 0.12), 0.25)


def _stain_alpha(rng: np.random.Generator, size: int, region: np.ndarray) -> np.ndarray:
    """A wider blob fading out at its edge."""
    return _blob_alpha(rng, size, region, size * rng.uniform(0.09, 0.15), 0.6)


def _scratch_look(img: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scraped surface: lighter (bare material) or darker (groove), texture still showing."""
    amount = rng.uniform(0.3, 0.45)
    level = (img.mean(-1) * alpha).sum() / (alpha.sum() + 1e-9)
    # A light scratch on an already light surface would hardly show, and vice versa.
    lighter = rng.random() < 0.5 if 90 <= level <= 160 else level < 90
    return img + amount * (255 - img) if lighter else img * (1 - amount)


def _crack_look(img: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A split in the surface reads as a dark line."""
    return img * (1 - rng.uniform(0.4, 0.55))


def _spot_look(img: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hole or foreign speck: the surface's texture replaced by a duller, grainier patch."""
    size = img.shape[0]
    weight = alpha.sum() + 1e-9
    local = (img * alpha[..., None]).sum((0, 1)) / weight
    if rng.random() < 0.5:
        colour = local * rng.uniform(0.5, 0.7)  # hole: the darker layer beneath
    else:
        dirt = np.array([1.0, 0.92, 0.82]) * (1 + rng.normal(0, 0.03, 3))
        colour = local * dirt * rng.uniform(0.65, 0.85)  # deposit: dirt or rust, brownish
    grain = 1 + 0.12 * _noise(rng, size, 1.2)
    # Sensor noise too, or the patch would stand out as too clean.
    return colour * grain[..., None] + rng.normal(0, 2.5, img.shape)


def _stain_look(img: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Discolouration (rust, oil, water): channels dimmed unevenly, darkest at a dried rim."""
    # Blue absorbed most, red least: the brown-to-grey range of real stains, never neon.
    tint = np.sort(rng.uniform(0.55, 1.0, 3))
    rim = 4 * alpha * (1 - alpha)
    return img * (1 - rng.uniform(0.28, 0.4) * tint * (1 + 0.5 * rim)[..., None])


_DEFECT_SHAPE = {
    "scratch": _scratch_alpha,
    "crack": _crack_alpha,
    "spot": _spot_alpha,
    "stain": _stain_alpha,
}
_DEFECT_LOOK = {
    "scratch": _scratch_look,
    "crack": _crack_look,
    "spot": _spot_look,
    "stain": _stain_look,
}


# Typical extent (the longer side of its bounding box) of each defect shape as a share of the
# canvas it is drawn on; measured, so that a canvas sized for a wanted extent mostly hits it.
_EXTENT_SHARE = {"scratch": 0.32, "crack": 0.25, "spot": 0.21, "stain": 0.245}
_SMALLEST_DEFECT_PX = 4


def _check_defect_px(defect_px: Sequence[int], size: int) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in defect_px)
    except (TypeError, ValueError):
        raise ValueError(f"defect_px={defect_px!r} must be two integers (lo, hi)") from None
    if not _SMALLEST_DEFECT_PX <= lo <= hi or hi > size // 2:
        raise ValueError(
            f"defect_px={defect_px!r} must satisfy {_SMALLEST_DEFECT_PX} <= lo <= hi <= size/2 "
            f"(size={size})"
        )
    return lo, hi


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a small bool array, numpy only (label spreading)."""
    if not mask.any():
        return mask
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        p = np.pad(labels, 1)
        spread = np.maximum.reduce(
            [p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]
        )
        spread = np.where(mask, spread, 0)
        if np.array_equal(spread, labels):
            break
        labels = spread
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _small_alpha(
    rng: np.random.Generator, defect: str, lo: int, hi: int
) -> np.ndarray | None:
    """A `defect`'s blending weights on a square canvas just holding it, lo..hi px across
    (one 4-connected piece, off the canvas edge), or None when this draw missed the range."""
    across = rng.uniform(lo, hi)
    canvas = max(8, int(np.ceil(across / _EXTENT_SHARE[defect])))
    centre = np.zeros((canvas, canvas), bool)
    c = canvas // 2
    centre[c - 1:c + 1, c - 1:c + 1] = True
    alpha = _DEFECT_SHAPE[defect](rng, canvas, centre)
    alpha = np.where(alpha >= _ALPHA_FLOOR, alpha, 0.0)
    piece = _largest_component(alpha > 0)
    ys, xs = np.nonzero(piece)
    if len(ys) == 0 or min(ys.min(), xs.min()) == 0 or max(ys.max(), xs.max()) == canvas - 1:
        return None
    extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    if not lo <= extent <= hi:
        return None
    # Crop to a square of side `extent` around the piece (the looks want a square image).
    alpha = np.pad(alpha * piece, extent)
    y0 = ys.min() + extent - (extent - (ys.max() - ys.min() + 1)) // 2
    x0 = xs.min() + extent - (extent - (xs.max() - xs.min() + 1)) // 2
    return alpha[y0:y0 + extent, x0:x0 + extent]


def _place(rng: np.random.Generator, region: np.ndarray, local: np.ndarray) -> tuple[int, int] | None:
    """Top-left corner where every pixel of `local` lands inside `region`, or None."""
    size, side = region.shape[0], local.shape[0]
    for _ in range(200):
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
        if region[y0:y0 + side, x0:x0 + side][local].all():
            return y0, x0
    return None


def _add_small_defect(
    image: np.ndarray, defect: str, rng: np.random.Generator, region: np.ndarray,
    lo: int, hi: int,
) -> tuple[np.ndarray, np.ndarray]:
    """add_defect with defect_px: the shape and its look are made in a small window only."""
    for _ in range(100):
        alpha = _small_alpha(rng, defect, lo, hi)
        if alpha is None:
            continue
        local = alpha > 0
        corner = _place(rng, region, local)
        if corner is not None:
            break
    else:
        raise RuntimeError(f"could not place a {defect} {lo}-{hi} px across in the region")
    y0, x0 = corner
    side = alpha.shape[0]
    window = (slice(y0, y0 + side), slice(x0, x0 + side))
    crop = image[window].astype(np.float64)
    target = _DEFECT_LOOK[defect](crop, alpha, rng)
    blended = crop + (target - crop) * alpha[..., None]
    painted = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out = image.copy()
    out[window][local] = painted[local]
    mask = np.zeros(image.shape[:2], bool)
    mask[window] = local
    return out, mask


def add_defect(
    image: np.ndarray,
    defect: str,
    rng: np.random.Generator,
    *,
    category: str | None = None,
    region: np.ndarray | None = None,
    defect_px: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one `defect` into `image`; return (defective image, bool mask of changed pixels).

    The defect lies inside `region` (bool HxW) when given; otherwise, for an object
    `category`, on the object found by `object_region`; otherwise anywhere. Pixels outside
    the mask are returned unchanged, byte for byte.

    By default the defect's size scales with the image (MIN_DEFECT_AREA..MAX_DEFECT_AREA of
    it). With ``defect_px=(lo, hi)`` it is lo..hi pixels across (the longer side of its
    bounding box) at any image size, one 4-connected piece, drawn in a small window: fast on
    a 4k image.
    """
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; choose from {', '.join(DEFECTS)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be square HxWx3, got shape {image.shape}")
    size = image.shape[0]
    _check_size(size)
    if defect_px is not None:
        lo, hi = _check_defect_px(defect_px, size)
    if region is None:
        if category is not None:
            _check_category(category)
        if category is not None and CATEGORIES[category] == "object":
            region = object_region(image)
        else:
            region = np.ones((size, size), bool)
    area = float(region.sum())
    if area < 0.05 * size * size:
        raise ValueError(f"defect region covers {area:.0f} pixels, too few to place a {defect}")
    if defect_px is not None:
        return _add_small_defect(image, defect, rng, region, lo, hi)
    inner = _erode(region, max(1, round(size / 16)))
    anchors = inner if inner.sum() >= 0.02 * area else region
    lo, hi = MIN_DEFECT_AREA * size * size, MAX_DEFECT_AREA * size * size
    for _ in range(50):
        alpha = _DEFECT_SHAPE[defect](rng, size, anchors) * region
        alpha = np.where(alpha >= _ALPHA_FLOOR, alpha, 0.0)
        mask = alpha > 0
        if lo <= mask.sum() <= hi:
            break
    else:
        raise RuntimeError(f"could not place a {defect} of plausible size in the region")
    img = image.astype(np.float64)
    target = _DEFECT_LOOK[defect](img, alpha, rng)
    blended = img + (target - img) * alpha[..., None]
    painted = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(mask[..., None], painted, image), mask


# ---------------------------------------------------------------- data set on disk


def _rng(seed: int, category: str, split: int, kind: int, index: int) -> np.random.Generator:
    """One independent stream per image, stable across processes and category subsets."""
    key = [seed, zlib.crc32(category.encode()), split, kind, index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _save_png(array: np.ndarray, path: Path) -> None:
    # Pillow writes no timestamp into PNGs, so equal arrays give equal bytes.
    Image.fromarray(array).save(path, format="PNG")


def generate(
    out: str,
    *,
    categories: Sequence[str] | None = None,
    size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 6,
    seed: int = 0,
    defect_px: tuple[int, int] | None = None,
) -> dict:
    """Write an MVTec-AD-layout data set under the local directory `out`.

    `n_test_defect` is per defect type. Existing files of the same names are overwritten.
    `size` is at most MAX_SIZE; `defect_px=(lo, hi)` makes every defect lo..hi pixels across
    instead of a share of the image (see add_defect), e.g. size=4096, defect_px=(10, 40) for
    defects that vanish when the image is shrunk to 256 px.
    Returns {category: {"train": n, "test_good": n, "test_defect": n}}.
    """
    names = list(CATEGORIES) if categories is None else list(categories)
    if not names:
        raise ValueError("categories is empty; leave it out for all of " + ", ".join(CATEGORIES))
    for name in names:
        _check_category(name)
    _check_size(size)
    if defect_px is not None:
        _check_defect_px(defect_px, size)
    counts = {"n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
    for label, n in counts.items():
        if n < 0:
            raise ValueError(f"{label}={n} must be zero or more")
    root = Path(out)
    summary: dict[str, dict[str, int]] = {}
    for name in names:
        cat_dir = root / name
        for split, (sub, n) in enumerate((("train/good", n_train), ("test/good", n_test_good))):
            folder = cat_dir / sub
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = make_image(name, _rng(seed, name, split, 0, i), size)
                _save_png(image, folder / f"{i:03d}.png")
        for kind, defect in enumerate(DEFECTS, start=1):
            img_dir = cat_dir / "test" / defect
            mask_dir = cat_dir / "ground_truth" / defect
            img_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n_test_defect):
                rng = _rng(seed, name, 2, kind, i)
                good, region = _render(name, rng, size)
                bad, mask = add_defect(good, defect, rng, region=region, defect_px=defect_px)
                _save_png(bad, img_dir / f"{i:03d}.png")
                _save_png(mask.astype(np.uint8) * 255, mask_dir / f"{i:03d}_mask.png")
        summary[name] = {
            "train": n_train,
            "test_good": n_test_good,
            "test_defect": n_test_defect * len(DEFECTS),
        }
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: generate the data set and print what went where."""
    parser = argparse.ArgumentParser(
        prog="python -m anomaly_core.data.synthetic",
        description="Write a procedural MVTec-AD-style data set of textures and objects.",
    )
    parser.add_argument("--out", required=True, help="output directory (local)")
    parser.add_argument("--categories", default=None,
                        help=f"comma-separated subset of {','.join(CATEGORIES)} (default: all)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=40,
                        help="normal training images per category")
    parser.add_argument("--n-test-good", type=int, default=10,
                        help="normal test images per category")
    parser.add_argument("--n-test-defect", type=int, default=6,
                        help="defective test images per category and defect type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defect-px", default=None, metavar="LO,HI",
                        help="make defects LO..HI pixels across at any --size (e.g. 10,40 with "
                             "--size 4096); default: a share of the image")
    args = parser.parse_args(argv)
    cats = None
    if args.categories is not None:
        cats = [c.strip() for c in args.categories.split(",") if c.strip()]
    defect_px = None
    if args.defect_px is not None:
        try:
            lo, hi = (int(v) for v in args.defect_px.split(","))
        except ValueError:
            parser.error(f"--defect-px {args.defect_px!r} must be two integers LO,HI")
        defect_px = (lo, hi)
    start = time.perf_counter()
    try:
        summary = generate(args.out, categories=cats, size=args.size, n_train=args.n_train,
                           n_test_good=args.n_test_good, n_test_defect=args.n_test_defect,
                           seed=args.seed, defect_px=defect_px)
    except ValueError as err:
        parser.error(str(err))
    for name, n in summary.items():
        print(f"{name:10s} ({CATEGORIES[name]}): {n['train']} train, {n['test_good']} test good, "
              f"{n['test_defect']} test defect ({', '.join(DEFECTS)})")
    print(f"wrote {args.size}x{args.size} PNGs to {Path(args.out).resolve()} "
          f"in {time.perf_counter() - start:.1f} s (seed {args.seed})")


if __name__ == "__main__":
    main()
