"""The one image decoder: PNG, JPEG, BMP or TIFF bytes to an HxWx3 uint8 RGB array, the one
resize, and the score job's read stage (`read_image`). No torch: decode workers start quickly.

Training and scoring both decode through here, so a given file gives the same pixels in both.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from anomaly_core import storage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 100_000_000

# Pillow format names for IMAGE_EXTENSIONS; anything else Pillow can open is refused by name.
_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Modes Pillow converts to RGB faithfully; LAB and HSV it converts by copying bytes, wrongly.
_CONVERTIBLE_MODES = ("1", "L", "P", "CMYK", "YCbCr", "RGBX", *_ALPHA_MODES)
_CORRUPT_HINT = "the file is truncated or corrupt; re-export or re-upload it, or remove it"
# ANOMALY_DECODER=pillow decodes every file with Pillow, as before the fast decoders (to compare
# pixels, or where a fast decoder misbehaves); the default picks the fastest decoder per file.
DECODER_ENV = "ANOMALY_DECODER"

# Our max_pixels check runs on the header size before any pixel is decoded. Pillow's global
# limit would warn from 89M pixels and refuse above 179M whatever max_pixels a caller passes,
# so it is switched off and this module's limit is the only one.
Image.MAX_IMAGE_PIXELS = None


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; str is "<uri>: <reason> (<what to do>)"."""

    def __init__(self, uri: str, reason: str = "", hint: str = "") -> None:
        # Every argument is kept in args so the error pickles (Ray) and a single-argument call
        # still works: torch's DataLoader re-raises worker errors as type(err)(message).
        super().__init__(uri, reason, hint)
        self.uri = uri
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        if not self.reason:
            return self.uri
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.uri}: {self.reason}{hint}"


def decode_image(
    data: bytes,
    uri: str = "<bytes>",
    *,
    max_pixels: int = MAX_PIXELS,
    target: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode PNG/JPEG/BMP/TIFF bytes to a C-contiguous HxWx3 uint8 RGB array.

    Grayscale is repeated to three channels; alpha (RGBA, LA, palette transparency) is
    composited on black so fully transparent pixels are black whatever colour they hide;
    16-bit samples keep their high byte (65535 -> 255, 32768 -> 128), as Pillow does for
    16-bit RGB PNG and TIFF; float images must lie in [0, 1] and are scaled by 255; the EXIF
    orientation is applied; a multi-frame TIFF gives its first frame. Any failure raises
    ImageDecodeError naming ``uri``.

    ``target`` (height, width) is the size the caller will resize the result to. A JPEG then
    decodes at the smallest of 1/8, 1/4, 1/2 or full scale that is still at least ``target``
    on both sides (libjpeg's DCT scaling: an 8000 px JPEG for a 2048 px model never exists
    at full size in memory), so the result may be smaller than the file but never smaller than
    ``target``, unless the file itself is; the caller resizes the rest. Other formats decode
    at full size. ``max_pixels`` is checked on the file's full size, from the header.
    """
    return _decoded(data, uri, max_pixels, target)[0]


def _decoded(data: bytes, uri: str, max_pixels: int, target: tuple[int, int] | None
             ) -> tuple[np.ndarray, tuple[int, int]]:
    """decode_image's pixels and the image's (height, width) as shown (EXIF rotation applied):
    the size of its mask and heatmap when `target` decoded it smaller. One header read."""
    image = _open(data, uri, max_pixels)
    width, height = image.size
    shown = (width, height) if _orientation(image, data) in (5, 6, 7, 8) else (height, width)
    if target is not None:
        target = _checked_target(target)
    fast = _fast_decode(image, data, target)
    if fast is not None:
        return fast, shown
    if target is not None:
        _draft(image, data, target)
    try:
        # Image.open only reads the header; load() decodes now so a cut-off file fails here.
        image.load()
        image = ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception as err:
        raise ImageDecodeError(
            uri, f"cannot decode {image.format} pixel data ({err})", _CORRUPT_HINT
        ) from err
    return _to_rgb(image, uri), shown


def _draft(image: Image.Image, data: bytes, target: tuple[int, int]) -> None:
    """Ask a JPEG's decoder for a reduced scale no smaller than `target` (height, width),
    which is in the displayed orientation: for an EXIF rotation by 90 degrees the stored
    image's width is the displayed height."""
    height, width = target
    if image.format not in ("JPEG", "MPO"):
        return
    if _orientation(image, data) in (5, 6, 7, 8):
        height, width = width, height
    # Mode None: no colour conversion in the decoder; _to_rgb converts as for a full decode.
    image.draft(None, (width, height))


def _checked_target(target) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in target)
    except (TypeError, ValueError):
        raise ValueError(f"target={target!r} must be (height, width)") from None
    if height < 1 or width < 1:
        raise ValueError(f"target={target!r} must be positive")
    return height, width


def _orientation(image: Image.Image, data: bytes) -> int:
    """The EXIF orientation (1 = upright) of an opened image, from its header. A PNG's eXIf
    chunk may follow the pixels, and Pillow decodes them all to look for it: a PNG without one
    anywhere in its bytes is upright without asking."""
    if image.format == "PNG" and b"eXIf" not in data:
        return 1
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1  # an unreadable EXIF block: exif_transpose ignores it too


# The fast decoders, imported on first use: optional (without them Pillow decodes everything,
# as on a machine where their wheels are missing).
_FAST: dict[str, Any] = {}


def _fast_module(name: str) -> Any:
    if name not in _FAST:
        try:
            _FAST[name] = __import__(name)
        except ImportError:
            _FAST[name] = None
    return _FAST[name]


def decoder_for(image: Image.Image, data: bytes) -> str:
    """Which decoder takes an opened file: "pyspng" (libspng) for an 8-bit RGB, RGBA, gray or
    gray-alpha PNG without palette, transparency key or EXIF; "simplejpeg" (libjpeg-turbo, with
    DCT-domain scaling) for an upright RGB or grayscale JPEG; "pillow" for everything else
    (16-bit, palette, CMYK, EXIF rotation, TIFF, BMP), for all files under
    ANOMALY_DECODER=pillow, and where the fast decoder's wheel is not installed."""
    if os.environ.get(DECODER_ENV, "").lower() == "pillow":
        return "pillow"
    if image.format == "PNG":
        # IHDR is the first chunk: its bit depth is byte 24. eXIf may sit anywhere in the file.
        fast = (image.mode in ("RGB", "L", "RGBA", "LA") and data[24] == 8
                and "transparency" not in image.info and b"eXIf" not in data)
        name = "pyspng"
    else:
        fast = (image.format == "JPEG" and image.mode in ("RGB", "L")
                and _orientation(image, data) == 1)
        name = "simplejpeg"
    return name if fast and _fast_module(name) is not None else "pillow"


def _fast_decode(image: Image.Image, data: bytes,
                 target: tuple[int, int] | None) -> np.ndarray | None:
    """The pixels by the file's fast decoder (decoder_for), or None for Pillow's path. Both
    fast decoders give Pillow's pixels (tested). Any failure goes back to Pillow, whose verdict
    on a bad file (the error row) stays what it was."""
    name = decoder_for(image, data)
    try:
        if name == "pyspng":
            if not _png_chunks_intact(data):
                return None  # libspng skips checksums: Pillow says what is wrong
            pixels = _fast_module(name).load(data)
        elif name == "simplejpeg":
            # Pillow's draft scale (1/8, 1/4, 1/2 or 1, the largest that keeps the target), so
            # that the pixels are Pillow's: libjpeg-turbo's other n/8 scales filter otherwise.
            width, height = image.size
            scale = 1
            if target is not None:
                fits = min(width // target[1], height // target[0])
                scale = next(s for s in (8, 4, 2, 1) if fits >= s)
            return _fast_module(name).decode_jpeg(data, colorspace="RGB",
                                                  min_height=-(-height // scale),
                                                  min_width=-(-width // scale))
        else:
            return None
    except Exception:
        return None
    if pixels.ndim == 2:
        return _gray_to_rgb(pixels)
    if pixels.shape[2] == 2:  # gray + alpha
        pixels = np.concatenate([np.repeat(pixels[:, :, :1], 3, axis=2), pixels[:, :, 1:]], 2)
    return _composite_on_black(pixels) if pixels.shape[2] == 4 else pixels


def _png_chunks_intact(data: bytes) -> bool:
    """Every chunk of a PNG whole, with its CRC right, up to IEND. pyspng decodes with libspng's
    checksums off: a file damaged in storage would give wrong pixels and no error. 0.13 ms for
    400 KB."""
    view, at = memoryview(data), 8
    while at + 12 <= len(data):
        length, = struct.unpack_from(">I", data, at)
        end = at + 8 + length
        if end + 4 > len(data):
            return False
        if zlib.crc32(view[at + 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return False
        if view[at + 4:at + 8] == b"IEND":
            return True
        at = end + 4
    return False


def plain_jpeg_size(data: bytes, uri: str = "<bytes>", *,
                    max_pixels: int = MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width) of a baseline RGB or grayscale JPEG without an EXIF rotation, read from
    its header (no pixel decoded; the same errors as decode_image for a bad header or too many
    pixels); None for anything else. Such a file decodes to the same image with another JPEG
    decoder (a GPU's), so it may skip decode_image; the others must not."""
    if _signature(data) != "JPEG":
        return None
    image = _open(data, uri, max_pixels)
    plain = (image.format == "JPEG" and image.mode in ("RGB", "L")
             and not image.info.get("progressive") and _orientation(image, data) == 1)
    return (image.size[1], image.size[0]) if plain else None


def decode_mask(data: bytes, uri: str = "<bytes>") -> np.ndarray:
    """Decode a ground-truth mask to an HxW bool array: any nonzero pixel is defect."""
    image = _open(data, uri, MAX_PIXELS)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("1", "L", "I", "F", *_SIXTEEN_BIT_MODES):
            pixels = np.asarray(image) != 0
        else:
            # Colour or palette masks: defect where any colour channel is nonzero; alpha ignored.
            pixels = np.asarray(image.convert("RGB")).any(axis=2)
    except MemoryError:
        raise
    except Exception as err:
        raise ImageDecodeError(
            uri, f"cannot decode mask {image.format} pixel data ({err})", _CORRUPT_HINT
        ) from err
    return np.ascontiguousarray(pixels, dtype=bool)


def load_image(uri: str, *, target: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image from a local path or s3:// URI and decode it to HxWx3 uint8 RGB
    (``target`` as for decode_image)."""
    return decode_image(storage.read_bytes(uri), uri, target=target)


def _open(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """Identify the format from the header and check the pixel count, decoding nothing yet."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Pillow would then fill a cut-off file with grey instead of failing on load().
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images "
            "would decode silently; set it back to False"
        )
    if len(data) == 0:
        raise ImageDecodeError(uri, "empty file (0 bytes)", "re-upload the image or remove it")
    stream = io.BytesIO(data)
    try:
        image = Image.open(stream, formats=_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data, uri) from None
    except MemoryError:
        raise
    except Exception as err:
        # A recognised signature with a broken header (bad IHDR, bad TIFF IFD, ...).
        name = _signature(data) or "image"
        raise ImageDecodeError(uri, f"unreadable {name} header ({err})", _CORRUPT_HINT) from err
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            uri,
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels",
            "pass a larger max_pixels if the image is genuine, else it may be a "
            "decompression bomb",
        )
    return image


def _unidentified(data: bytes, uri: str) -> ImageDecodeError:
    """Name the format Pillow sees outside our list, or say the bytes are no image at all."""
    name = _signature(data)
    if name:
        # Pillow reports some broken headers (a bad IHDR checksum) as an unknown format.
        return ImageDecodeError(uri, f"unreadable {name} header", _CORRUPT_HINT)
    try:
        other_format = Image.open(io.BytesIO(data)).format
    except Exception:
        other_format = None
    if other_format:
        return ImageDecodeError(
            uri,
            f"unsupported image format {other_format}",
            "convert it to PNG, JPEG, BMP or TIFF",
        )
    return ImageDecodeError(
        uri,
        f"not a recognised image (starts with {data[:8]!r})",
        "expected PNG, JPEG, BMP or TIFF bytes; check the path points at an image file",
    )


def _signature(data: bytes) -> str | None:
    """The supported format whose magic bytes start data, if any."""
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _to_rgb(image: Image.Image, uri: str) -> np.ndarray:
    """Convert any decoded Pillow mode to HxWx3 uint8 RGB, or raise naming the mode."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.array(image, dtype=np.uint8, order="C")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _gray_to_rgb(_sixteen_to_eight(np.asarray(image), mode, uri))
    if mode == "F":
        return _gray_to_rgb(_float_to_eight(np.asarray(image), uri))
    if mode not in _CONVERTIBLE_MODES and mode != "RGB":
        raise ImageDecodeError(
            uri, f"unsupported colour mode {mode}", "save it as RGB or grayscale"
        )
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_black(np.asarray(image.convert("RGBA")))
    # 1, L, P, CMYK (Adobe-inverted JPEG CMYK included), YCbCr: Pillow's own conversion.
    return np.array(image.convert("RGB"), dtype=np.uint8, order="C")


def _sixteen_to_eight(pixels: np.ndarray, mode: str, uri: str) -> np.ndarray:
    """Keep the high byte of 16-bit samples; 32-bit integer images must fit 16 bits."""
    if mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise ImageDecodeError(
            uri,
            f"32-bit integer pixels span {pixels.min()}..{pixels.max()}, outside 0..65535",
            "save it as an 8- or 16-bit image",
        )
    return (pixels.astype(np.uint32) >> 8).astype(np.uint8)


def _float_to_eight(pixels: np.ndarray, uri: str) -> np.ndarray:
    """Scale float pixels in [0, 1] to 0..255; other ranges have no safe meaning, so refuse."""
    if not np.isfinite(pixels).all():
        raise ImageDecodeError(uri, "float image has NaN or infinite pixels", "save it as 8-bit")
    if pixels.size and (pixels.min() < 0.0 or pixels.max() > 1.0):
        raise ImageDecodeError(
            uri,
            f"float pixels span {pixels.min():g}..{pixels.max():g}, outside [0, 1]",
            "scale it to [0, 1] or save it as an 8- or 16-bit image",
        )
    return np.rint(pixels * 255.0).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """Repeat an HxW uint8 array into HxWx3."""
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """Blend RGBA over black, rounding: rgb * alpha / 255."""
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = rgba[:, :, 3:].astype(np.uint16)
    return np.ascontiguousarray(((rgb * alpha + 127) // 255).astype(np.uint8))


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate a (height, width) pair."""
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in size):
        raise ValueError(f"size {size!r} must be (height, width), two positive ints")
    return int(size[0]), int(size[1])


def resize_pixels(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 RGB to uint8 [3, height, width], resized bilinear (antialiased).

    The one resize used by training and scoring (datasets.resize_image wraps it in a tensor),
    so both see the same pixels. Scoring ships this uint8 array (a quarter of float32's bytes)
    and makes floats on the model's device.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be an HxWx3 uint8 array (decode_image gives one), got "
            f"{image.dtype} of shape {image.shape}"
        )
    height, width = check_size(size)
    if image.shape[:2] != (height, width):
        # PIL's bilinear widens its filter when downscaling, unlike torch's interpolate,
        # so fine texture is averaged rather than aliased.
        resized = Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR)
        image = np.asarray(resized)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


# The score job's decode stage: CPU tasks that import this module and not torch (importing
# torch took 5 s a worker on 2 cores, before the first image of a run could be decoded).
def read_image(
    uri: str,
    size: tuple[int, int],
    *,
    etag: str | None = None,
    prev_etag: str | None = None,
    max_pixels: int = MAX_PIXELS,
    keep_jpeg: bool = False,
    resize: bool = True,
) -> dict[str, Any]:
    """One input row: file facts plus the resized uint8 image [3,H,W], or `error` and no image.

    `etag` is the listing's (S3); without one the content hash is the etag. A row whose etag
    equals `prev_etag` (already scored by this model version) comes back `skipped`, undecoded.
    With `keep_jpeg`, a plain JPEG (plain_jpeg_size) comes back undecoded with its bytes in
    `jpeg`, for the model's device to decode (Scorer.decode_jpegs). Without `resize` the image
    stays at its decoded size (a JPEG's reduced scale, never below `size`), for the model's
    device to resize (Scorer.resize).
    """
    row: dict[str, Any] = {"uri": uri, "etag": etag, "size_bytes": None, "width": None,
                           "height": None, "error": None, "image": None, "skipped": False,
                           "jpeg": None}
    try:
        data = storage.read_bytes(uri)
        row["size_bytes"] = len(data)
        row["etag"] = etag or "sha256:" + hashlib.sha256(data).hexdigest()
        if prev_etag is not None and row["etag"] == prev_etag:
            row["skipped"] = True
            return row
        if keep_jpeg and (size_hw := plain_jpeg_size(data, uri, max_pixels=max_pixels)):
            row["height"], row["width"] = size_hw
            row["jpeg"] = data
            return row
        # A JPEG much larger than `size` decodes at a reduced scale (never below `size`).
        pixels, (row["height"], row["width"]) = _decoded(data, uri, max_pixels, size)
        row["image"] = (resize_pixels(pixels, size) if resize
                        else np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    except storage.StoreUnavailable:
        raise  # the store, not the image: the job stops and a rerun resumes (no error row)
    except (storage.StorageError, ImageDecodeError) as exc:
        row["error"] = str(exc)
    except Exception as exc:  # never lose a row to a surprise in a decoder
        row["error"] = f"{uri}: unexpected {type(exc).__name__}: {exc}"
    return row
