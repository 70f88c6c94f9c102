"""The model stage of scoring, independent of Ray: run the model on a batch of uint8 images
(floats made on the model's device), turn raw output into row fields (normalized score, binary
mask PNG, 8-bit heatmap PNG)."""

from __future__ import annotations

import contextlib
import io
import math
import struct
import threading
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from anomaly_core.data.datasets import to_unit_float
from anomaly_core.detectors.base import AnomalyOutput
from anomaly_core.features.backbones import batchnorm_folded
from anomaly_core.features.precision import compute_precision, resolve_precision
from anomaly_core.model.artifact import ModelArtifact
from anomaly_core.model.calibration import Calibration

__all__ = ["HEATMAPS", "Scorer", "decode_png", "encode_mask_png", "encode_png", "outputs",
           "packed_bits", "render_maps", "wants_heatmap"]

# --heatmaps: which rows get a heatmap PNG (masks are always made).
HEATMAPS = ("all", "anomalous", "none")


class Scorer:
    """An artifact's detector ready for uint8 batches on one device.

    Images cross to the device as uint8 (from pinned memory, without blocking, on the calling
    thread's own CUDA stream, so two threads overlap one batch's copy with another's compute)
    and become floats there; the networks run in 16 bits when asked (anomaly_core.features.precision
    says which parts; "auto" is each detector's GPU precision), channels_last, with BatchNorms
    folded into the convolutions (backbones.batchnorm_folded: the artifact's detector keeps its
    own layers), optionally compiled.
    """

    def __init__(
        self,
        artifact: ModelArtifact,
        *,
        device: str = "cpu",
        precision: str = "auto",
        channels_last: bool = True,
        fold_batchnorm: bool = True,
        compile: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device,
                                           artifact.detector.gpu_precision)
        # channels_last by default on every device: measured faster for every detector on CPU
        # too (1.01x ViT-kNN to 1.33x PatchCore; bench/inference_layout.py).
        self.channels_last = channels_last
        # The artifact's detector moves to the device whole (as before folding: nothing of it
        # is left behind on the host), then the folded copy of its backbones is made there.
        detector = artifact.detector.to(self.device).eval()
        if fold_batchnorm:
            detector = batchnorm_folded(detector)
        if self.channels_last:
            detector.to(memory_format=torch.channels_last)
        self.model = torch.compile(detector) if compile else detector
        self._local = threading.local()

    def _stream(self) -> torch.cuda.Stream | None:
        if self.device.type != "cuda":
            return None
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device)
        return self._local.stream

    def streamed(self) -> contextlib.AbstractContextManager:
        """The calling thread's own CUDA stream as the current one (nothing off GPUs): a caller
        that also renders or copies results puts that work there too, not on the default
        stream every thread shares."""
        stream = self._stream()
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _hand_over(self, stream: torch.cuda.Stream | None, *tensors: torch.Tensor) -> None:
        """Results made on this thread's stream, safe for the caller's (current) stream: it waits
        for them there, and their memory is not reused before its work on them is done. Without
        this the caller reads them too early (measured on an H200: PatchCore's scores were
        another batch's, image AUROC 0.20 instead of 0.78)."""
        if stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for t in tensors:
            t.record_stream(current)

    def to_device(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images to the device: pinned and without blocking on a GPU (this thread's
        stream)."""
        batch = torch.as_tensor(images)
        if batch.device.type == self.device.type:
            return batch
        stream = self._stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            out = batch.pin_memory().to(self.device, non_blocking=True)
        self._hand_over(stream, out)
        return out

    @torch.no_grad()
    def decode_jpegs(self, files: list[bytes], size: tuple[int, int]) -> list[torch.Tensor | str]:
        """Plain JPEG files decoded on the device (nvJPEG on a GPU) and resized there like
        resize_image (bilinear, antialiased): a uint8 [3,H,W] tensor per file, or the reason it
        failed. Decoded as one batch; one bad file sends each to its own decode."""
        from torchvision.io import ImageReadMode, decode_jpeg

        def resized(image: torch.Tensor) -> torch.Tensor:
            return resize_uint8(image, size)

        data = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
        stream = self._stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                out: list[torch.Tensor | str] = [
                    resized(im) for im in decode_jpeg(data, mode=ImageReadMode.RGB,
                                                      device=self.device)]
            except RuntimeError:
                out = []
                for one in data:
                    try:
                        out.append(resized(decode_jpeg(one, mode=ImageReadMode.RGB,
                                                       device=self.device)))
                    except RuntimeError as err:
                        out.append(f"cannot decode JPEG pixel data ({err}); the file is "
                                   "truncated or corrupt: re-export or re-upload it, or remove it")
        self._hand_over(stream, *(t for t in out if isinstance(t, torch.Tensor)))
        return out

    @torch.no_grad()
    def resize(self, images: list, size: tuple[int, int]) -> torch.Tensor:
        """uint8 images [3,h,w] of any sizes (arrays in host memory, or tensors already on the
        device) as one uint8 batch [B,3,H,W] on the device, each resized there like
        resize_image (bilinear, antialiased; within a grey level of Pillow's)."""
        stream = self._stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            out = torch.stack([resize_uint8(self.to_device(np.ascontiguousarray(im))
                                            if not isinstance(im, torch.Tensor) else im, size)
                               for im in images])
        self._hand_over(stream, out)
        return out

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor) -> AnomalyOutput:
        """Raw scores [B] and maps [B,h,w] (float32, on the device) for uint8 images [B,3,H,W]
        in host memory (or already on the device)."""
        batch = torch.as_tensor(images)
        if batch.dtype != torch.uint8:
            raise TypeError(f"Scorer takes uint8 images [B,3,H,W], got {batch.dtype}")
        batch = self.to_device(batch)
        stream = self._stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if not getattr(self.model, "takes_uint8", False):  # tiled: floats a tile batch at a time
                batch = to_unit_float(batch)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with compute_precision(self.precision):
                out = self.model(batch)
            if self.precision != "fp32" and not bool(torch.isfinite(out.score).all()):
                out = self.model(batch)  # 16 bits overflowed somewhere: this batch in float32
            result = AnomalyOutput(score=out.score.float(), map=out.map.float())
        self._hand_over(stream, result.score, result.map)
        return result


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 image [3,h,w] at `size` (height, width), bilinear, antialiased when shrinking, on
    its own device: the model device's counterpart of decode.resize_pixels (Pillow's)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=tuple(size), mode="bilinear",
                        align_corners=False, antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


# Masks and heatmaps above this many pixels are rendered a strip of rows at a time, so an
# 8,000 x 8,000 image never holds its map as floats at its own size (256 MB, and as many again
# for each temporary): only a strip's worth (STRIP_ROWS rows) is float at a time.
STRIP_PIXELS = 1 << 22
STRIP_ROWS = 256
# Output pixels of same-size maps rendered at once (64 MiB as float32): a batch of 64 maps of
# 2,048 px is 4 at a time, not one 1 GiB tensor and its temporaries.
GROUP_PIXELS = 1 << 24


def _resized_strips(amap: torch.Tensor, size: tuple[int, int], rows: int):
    """(first row, last row, rows of `amap` resized to `size`) a strip at a time. A strip is
    resized from the source rows under it plus a margin wider than the bilinear (and, when
    shrinking, antialiasing) kernel, in whole units of q source rows to p output rows (p/q the
    reduced ratio of the heights), so each strip uses the full map's scale and kernel and agrees
    with resizing the whole map (to float rounding). Heights with no common factor are one
    strip."""
    (h, w), (height, width) = amap.shape, size
    if (h, w) == (height, width):
        for start in range(0, height, rows):
            yield start, min(height, start + rows), amap[start:start + rows]
        return
    units = math.gcd(h, height)
    q, p = h // units, height // units
    margin = math.ceil((math.ceil(h / height) + 2) / q)  # kernel reach in source rows, in units
    step = max(1, rows // p)
    for u0 in range(0, units, step):
        u1 = min(units, u0 + step)
        a0, a1 = max(0, u0 - margin), min(units, u1 + margin)
        part = F.interpolate(amap[a0 * q:a1 * q][None, None], size=((a1 - a0) * p, width),
                             mode="bilinear", align_corners=False, antialias=True)[0, 0]
        yield u0 * p, u1 * p, part[(u0 - a0) * p:(u1 - a0) * p]


def packed_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask [..., H, W] as uint8 [..., H, ceil(W / 8)], eight pixels a byte, the first the
    highest bit (numpy.packbits' order, a 1-bit PNG's), made on the mask's device (on CPU by
    numpy: 0.3 ms at 2,048 px, where these tensor operations took 6 ms)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy(), axis=-1))
    return _packed_by_tensors(mask)


def _packed_by_tensors(mask: torch.Tensor) -> torch.Tensor:
    """packed_bits on any device, in tensor operations (a GPU's)."""
    mask = mask.to(torch.uint8)
    if mask.shape[-1] % 8:
        mask = F.pad(mask, (0, 8 - mask.shape[-1] % 8))
    bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (mask.unflatten(-1, (-1, 8)) * bits).sum(-1, dtype=torch.uint8)


def _render(part: torch.Tensor, t: float, span: float, heat: bool = True,
            packed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask 0/255, or its bits packed, and 8-bit heatmap or None) as uint8 tensors from map
    values at their output size."""
    mask = packed_bits(part >= t) if packed else (part >= t).to(torch.uint8) * 255
    if not heat:
        return mask, None
    return mask, ((part - t) / span + 0.5).clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def _resized(part: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps [B,h,w] at `size`, bilinear; antialiased where shrinking (enlarging, the kernel is
    the same without it, at half the time: 0.57 against 1.02 ms for 256 to 512 px)."""
    if tuple(part.shape[-2:]) == size:
        return part
    shrinking = size[0] < part.shape[-2] or size[1] < part.shape[-1]
    return F.interpolate(part[:, None], size=size, mode="bilinear", align_corners=False,
                         antialias=shrinking)[:, 0]


def render_maps(
    maps: torch.Tensor,
    sizes: list[tuple[int, int]],
    calibration: Calibration,
    heats: list[bool] | None = None,
    packed: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Masks (0/255) and 8-bit heatmaps, uint8 at each image's (height, width), from raw maps
    [B,h,w] on whatever device they are: resized bilinear there (antialiased when shrinking),
    thresholded at the pixel threshold and windowed by the pixel calibration. `heats` says
    which images need a heatmap (default all); the others get None. `packed` gives each mask
    as its bits, eight pixels a byte ([height, ceil(width / 8)], packed_bits): an eighth of
    the bytes to copy and ship, ready for encode_mask_png. Maps of one output size
    are rendered together (one resize, one copy to the host per size: on a GPU the per-image
    calls, not the pixels, would be the cost); large outputs are made a strip of rows at a
    time (STRIP_PIXELS)."""
    t, span = calibration.window(pixel=True)
    sizes = [(int(h), int(w)) for h, w in sizes]
    heats = [True] * len(sizes) if heats is None else list(heats)
    masks: list[np.ndarray | None] = [None] * len(sizes)
    out_heats: list[np.ndarray | None] = [None] * len(sizes)
    groups: dict[tuple[tuple[int, int], bool], list[int]] = {}
    for i, size in enumerate(sizes):
        if size[0] * size[1] > STRIP_PIXELS:
            masks[i], out_heats[i] = _render_in_strips(maps[i].float(), size, t, span, heats[i],
                                                       packed)
        else:
            groups.setdefault((size, heats[i]), []).append(i)
    for (size, heat), members in groups.items():
        per = max(1, GROUP_PIXELS // (size[0] * size[1]))
        for start in range(0, len(members), per):
            chunk = members[start:start + per]
            mask, heat_u8 = _render(_resized(maps[chunk].float(), size), t, span, heat, packed)
            mask = mask.cpu().numpy()
            heat_u8 = heat_u8.cpu().numpy() if heat_u8 is not None else None
            for j, i in enumerate(chunk):
                masks[i] = mask[j]
                out_heats[i] = heat_u8[j] if heat_u8 is not None else None
    return masks, out_heats


def _render_in_strips(amap: torch.Tensor, size: tuple[int, int], t: float, span: float,
                      heat: bool = True, packed: bool = False
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """render_maps for one large output, STRIP_ROWS rows at a time: an 8,000 x 8,000 map is
    never float at its full size."""
    mask = np.empty((size[0], -(-size[1] // 8)) if packed else size, dtype=np.uint8)
    out = np.empty(size, dtype=np.uint8) if heat else None
    for start, stop, part in _resized_strips(amap, size, STRIP_ROWS):
        m, h = _render(part, t, span, heat, packed)
        mask[start:stop] = m.cpu().numpy()
        if out is not None:
            out[start:stop] = h.cpu().numpy()
    return mask, out


# zlib settings of the mask and heatmap PNGs, written directly (numpy filters the rows, zlib
# compresses them). A heatmap's rows go through PNG's "up" filter, which leaves a smooth anomaly
# map as long runs of small values, and zlib's run-length strategy (Z_RLE) encodes those at the
# speed of a byte scan: 2.2 ms at 512 px and 23 ms at 2,048 px against 4.5 and 49 ms through
# Pillow (its adaptive filters, the same strategy), at 0.99-1.08x its bytes (one core,
# 2026-12-06). Level 3 of the default strategy had taken 1.6-2.2x Z_RLE's time, level 6 three
# times level 3 for 20 % fewer bytes. Encoding is most of the row stage, which bounds a GPU node.
PNG_LEVEL = 1
PNG_STRATEGY = zlib.Z_RLE


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(rows: np.ndarray, width: int, height: int, bit_depth: int) -> bytes:
    """A grayscale PNG from its filtered rows (filter byte first) [height, 1 + row bytes]."""
    z = zlib.compressobj(PNG_LEVEL, zlib.DEFLATED, 15, 9, PNG_STRATEGY)
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", z.compress(rows.data) + z.flush()) + _png_chunk(b"IEND", b""))


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG (a heatmap), rows "up"-filtered."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 2  # up: each byte minus the one above it (mod 256)
    rows[:1, 1:] = pixels[:1]
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])
    return _png(rows, width, height, 8)


def encode_mask_png(mask: np.ndarray, width: int | None = None) -> bytes:
    """A mask (nonzero: defect) as a 1-bit grayscale PNG: bits packed by numpy, rows unfiltered.
    0.07 ms at 512 px and 1.5 ms at 2,048 px, against 0.96 and 14 ms for the 8-bit PNG through
    Pillow, in 0.7-1.1x its bytes (one core, 2026-12-06). With `width`, `mask` is already
    packed (render_maps(packed=True)): [height, ceil(width / 8)]. Pillow reads the PNG as mode
    "1"; decode_png gives 0/255 as before."""
    height = mask.shape[0]
    if width is None:
        width, mask = mask.shape[1], np.packbits(mask.astype(bool, copy=False), axis=1)
    rows = np.zeros((height, (width + 7) // 8 + 1), dtype=np.uint8)  # filter byte 0: none
    rows[:, 1:] = mask
    return _png(rows, width, height, 1)


def wants_heatmap(heatmaps: str, anomalous: bool) -> bool:
    """Whether a row gets a heatmap under --heatmaps (all, anomalous or none)."""
    if heatmaps not in HEATMAPS:
        raise ValueError(f"heatmaps={heatmaps!r}: expected one of {', '.join(HEATMAPS)}")
    return heatmaps == "all" or (heatmaps == "anomalous" and anomalous)


def outputs(score: float, mask: np.ndarray, heat: np.ndarray | None,
            calibration: Calibration, mask_width: int | None = None) -> dict[str, Any]:
    """Score-row fields from one raw score and its rendered mask and heatmap (render_maps; with
    `mask_width`, the mask's bits packed); no heatmap (None) leaves heatmap_png null."""
    return {
        "score": float(score),
        "score_normalized": float(calibration.normalize(score)),
        "is_anomalous": bool(score >= calibration.threshold),
        "mask_png": encode_mask_png(mask, mask_width),
        "heatmap_png": None if heat is None else encode_png(heat),
    }


def decode_png(data: bytes) -> np.ndarray:
    """A mask or heatmap PNG from a score row back to a uint8 array (a mask: 0 or 255)."""
    image = Image.open(io.BytesIO(data))
    if image.mode == "1":
        return np.asarray(image).astype(np.uint8) * 255
    return np.asarray(image)
