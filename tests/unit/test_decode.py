"""Decoder: every input kind gives HxWx3 uint8 RGB, every bad input an ImageDecodeError."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from anomaly_core.data.decode import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    decode_mask,
    load_image,
)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    """Image bytes as Pillow writes them."""
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_16bit(pixels: np.ndarray, header_size: tuple[int, int] | None = None) -> bytes:
    """A 16-bit-per-sample PNG written by hand (Pillow cannot write 16-bit RGB).

    header_size (height, width) makes the header claim another size than the pixels have.
    """
    height, width = header_size or pixels.shape[:2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if pixels.ndim == 2 else pixels.shape[2]]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def noise_rgb(height: int = 12, width: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_rgb(pixels: np.ndarray, height: int, width: int) -> None:
    assert pixels.shape == (height, width, 3)
    assert pixels.dtype == np.uint8
    assert pixels.flags.c_contiguous and pixels.flags.writeable


def test_image_extensions_are_the_four_supported_formats():
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_rgb_formats_decode_to_the_exact_pixels(fmt):
    pixels = noise_rgb()
    decoded = decode_image(encode(Image.fromarray(pixels), fmt))
    assert_rgb(decoded, 12, 16)
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_decodes_to_rgb_close_to_the_original():
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = (200, 40, 10)
    decoded = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert_rgb(decoded, 16, 16)
    assert np.abs(decoded.astype(int) - pixels).mean() < 4


def test_grayscale_is_repeated_into_three_channels():
    gray = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    decoded = decode_image(encode(Image.fromarray(gray), "PNG"))
    assert_rgb(decoded, 12, 16)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_one_bit_image_gives_black_and_white():
    image = Image.new("1", (4, 2), 0)
    image.putpixel((1, 0), 1)
    decoded = decode_image(encode(image, "PNG"))
    assert_rgb(decoded, 2, 4)
    assert decoded[0, 1].tolist() == [255, 255, 255]
    assert decoded.sum() == 3 * 255


def test_rgba_is_composited_on_black():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0] = (200, 100, 50, 255)  # opaque: unchanged
    rgba[0, 1] = (200, 100, 50, 0)  # transparent: black, whatever colour it hides
    rgba[0, 2] = (200, 100, 50, 128)  # half: scaled by 128/255, rounded
    decoded = decode_image(encode(Image.fromarray(rgba), "PNG"))
    assert_rgb(decoded, 1, 3)
    assert decoded[0].tolist() == [[200, 100, 50], [0, 0, 0], [100, 50, 25]]


def test_gray_with_alpha_is_composited_on_black():
    image = Image.fromarray(np.array([[200, 200]], np.uint8)).convert("LA")
    image.putalpha(Image.fromarray(np.array([[255, 0]], np.uint8)))
    assert image.mode == "LA"
    decoded = decode_image(encode(image, "PNG"))
    assert decoded[0].tolist() == [[200, 200, 200], [0, 0, 0]]


def test_palette_colours_are_expanded_and_transparent_index_is_black():
    image = Image.new("P", (3, 1), 0)
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    decoded = decode_image(encode(image, "PNG", transparency=0))
    assert decoded[0].tolist() == [[0, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data)
    assert_rgb(decoded, 8, 8)
    assert np.abs(decoded.astype(int) - [255, 0, 0]).max() <= 3


SIXTEEN = np.array([[0, 255, 257, 32768, 65535]], np.uint16)
SIXTEEN_AS_EIGHT = [0, 0, 1, 128, 255]  # the high byte: the full range kept, nothing clipped


def test_sixteen_bit_gray_png_keeps_the_full_range():
    data = encode(Image.fromarray(SIXTEEN), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode_image(data)
    assert_rgb(decoded, 1, 5)
    assert decoded[0, :, 0].tolist() == SIXTEEN_AS_EIGHT
    assert (decoded == decoded[:, :, :1]).all()


def test_sixteen_bit_big_endian_tiff_scales_like_png():
    image = Image.fromarray(SIXTEEN.astype(">u2"))
    assert image.mode == "I;16B"
    decoded = decode_image(encode(image, "TIFF"))
    assert decoded[0, :, 0].tolist() == SIXTEEN_AS_EIGHT


def test_sixteen_bit_rgb_png_scales_like_sixteen_bit_gray():
    pixels = np.stack([SIXTEEN[0], SIXTEEN[0][::-1], np.full(5, 32768, np.uint16)], axis=1)
    decoded = decode_image(png_16bit(pixels[None]))
    assert_rgb(decoded, 1, 5)
    assert decoded[0, :, 0].tolist() == SIXTEEN_AS_EIGHT
    assert decoded[0, :, 1].tolist() == SIXTEEN_AS_EIGHT[::-1]
    assert decoded[0, :, 2].tolist() == [128] * 5


def test_sixteen_bit_rgba_png_is_composited_on_black():
    pixels = np.array([[[65535, 32768, 0, 65535], [65535, 65535, 65535, 0]]], np.uint16)
    decoded = decode_image(png_16bit(pixels))
    assert decoded[0].tolist() == [[255, 128, 0], [0, 0, 0]]


def test_int32_tiff_within_sixteen_bits_scales_like_sixteen_bit():
    image = Image.fromarray(SIXTEEN.astype(np.int32))
    assert image.mode == "I"
    decoded = decode_image(encode(image, "TIFF"))
    assert decoded[0, :, 0].tolist() == SIXTEEN_AS_EIGHT


def test_int32_tiff_beyond_sixteen_bits_is_refused():
    image = Image.fromarray(np.array([[0, 70000]], np.int32))
    with pytest.raises(ImageDecodeError, match=r"big\.tif: 32-bit integer pixels span 0\.\.70000"):
        decode_image(encode(image, "TIFF"), "big.tif")


def test_float_tiff_in_unit_range_is_scaled_to_255():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert image.mode == "F"
    decoded = decode_image(encode(image, "TIFF"))
    assert decoded[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "values, reason",
    [
        ([0.0, 255.0], r"float pixels span 0\.\.255, outside \[0, 1\]"),
        ([0.0, np.nan], "float image has NaN"),
    ],
)
def test_float_tiff_outside_unit_range_is_refused(values, reason):
    image = Image.fromarray(np.array([values], np.float32))
    with pytest.raises(ImageDecodeError, match=r"float\.tif: " + reason):
        decode_image(encode(image, "TIFF"), "float.tif")


def test_lab_tiff_is_refused_naming_the_mode():
    # Pillow "converts" LAB to RGB by copying bytes, which would give wrong colours.
    data = encode(Image.new("LAB", (4, 4), (50, 0, 0)), "TIFF")
    with pytest.raises(ImageDecodeError, match="lab.tif: unsupported colour mode LAB"):
        decode_image(data, "lab.tif")


def test_multi_picture_jpeg_from_a_camera_gives_the_first_picture():
    first = Image.new("RGB", (8, 6), (200, 10, 10))
    second = Image.new("RGB", (8, 6), (10, 200, 10))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data)
    assert_rgb(decoded, 6, 8)
    assert np.abs(decoded.astype(int) - [200, 10, 10]).max() <= 4


def oriented(fmt: str) -> bytes:
    """A 4-high, 6-wide image with a red top-left block, EXIF orientation 6 (rotate 90 CW)."""
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[:2, :2] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt):
    decoded = decode_image(oriented(fmt))
    assert_rgb(decoded, 6, 4)  # transposed
    red = decoded[:, :, 0] > 128
    # Turning clockwise carries the top-left corner to the top-right.
    assert red[:2, 2:].all()
    assert red.sum() <= 6


def test_multi_frame_tiff_gives_the_first_frame():
    first = Image.new("RGB", (4, 3), (10, 20, 30))
    second = Image.new("RGB", (8, 8), (200, 0, 0))
    data = encode(first, "TIFF", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data)
    assert_rgb(decoded, 3, 4)
    assert (decoded == [10, 20, 30]).all()


def bad_inputs() -> dict[str, bytes]:
    good_png = encode(Image.fromarray(noise_rgb(64, 64)), "PNG")
    good_jpeg = encode(Image.fromarray(noise_rgb(64, 64)), "JPEG")
    corrupt_png = bytearray(good_png)
    corrupt_png[100:140] = bytes(40)  # inside the compressed pixel stream
    return {
        "empty": b"",
        "text": b"defect_id,score\n1,0.5\n",
        "truncated_png": good_png[: len(good_png) // 2],
        "truncated_jpeg": good_jpeg[: len(good_jpeg) - 100],
        "random": np.random.default_rng(1).bytes(2000),
        "corrupt_png": bytes(corrupt_png),
        "gif": encode(Image.new("RGB", (4, 4)), "GIF"),
        "short_header": good_png[:20],
        "bad_header_checksum": good_png[:16] + b"\x00\x00\x07" + good_png[19:],
    }


@pytest.mark.parametrize("kind", sorted(bad_inputs()))
def test_bad_input_raises_decode_error_naming_the_file(kind):
    uri = f"s3://parts/line-3/{kind}.png"
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(bad_inputs()[kind], uri)
    assert caught.value.uri == uri
    assert str(caught.value).startswith(f"{uri}: ")
    assert caught.value.reason and caught.value.hint


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "empty file"),
        ("text", "not a recognised image"),
        ("truncated_png", "truncated"),
        ("truncated_jpeg", "truncated"),
        ("gif", "unsupported image format GIF"),
        ("short_header", "unreadable PNG header"),
        ("bad_header_checksum", "unreadable PNG header"),
    ],
)
def test_bad_input_reason_says_what_is_wrong(kind, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(bad_inputs()[kind], "x.png")


def test_image_over_max_pixels_is_refused_with_the_size():
    data = encode(Image.new("RGB", (20, 10)), "PNG")
    assert decode_image(data, max_pixels=200).shape == (10, 20, 3)
    with pytest.raises(ImageDecodeError, match=r"a\.png: image is 20x10 = 200 pixels.* 199 "):
        decode_image(data, "a.png", max_pixels=199)


def test_huge_header_is_refused_by_our_limit_before_any_pixel_is_decoded():
    # 20000 x 20000 header over a 1-pixel stream: decoding would allocate 1.2 GB; Pillow's
    # own limit would raise DecompressionBombError; ours must answer first, from the header.
    data = png_16bit(np.zeros((1, 1, 3), np.uint16), header_size=(20000, 20000))
    with pytest.raises(ImageDecodeError, match="bomb.png: image is 20000x20000"):
        decode_image(data, "bomb.png")


def test_pillows_own_pixel_limit_is_out_of_the_way():
    # Pillow's own limit (89M pixels warn, 179M error) would fail open() on this header with
    # its DecompressionBombError before our per-call limit of 200M could answer.
    data = png_16bit(np.zeros((1, 1, 3), np.uint16), header_size=(15000, 15000))
    with pytest.raises(ImageDecodeError, match="huge.png: image is 15000x15000 = 225000000"):
        decode_image(data, "huge.png", max_pixels=200_000_000)


def test_decode_error_pickles_with_its_fields():
    error = ImageDecodeError("s3://b/k.png", "empty file (0 bytes)", "re-upload it")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.uri, copy.reason, copy.hint) == (error.uri, error.reason, error.hint)
    assert str(copy) == "s3://b/k.png: empty file (0 bytes) (re-upload it)"


def test_decode_error_rebuilt_from_one_message_keeps_it():
    # torch's DataLoader re-raises a worker's error as type(error)(message).
    message = "Caught ImageDecodeError in DataLoader worker process 0 ..."
    assert str(ImageDecodeError(message)) == message


def test_load_truncated_images_switched_on_is_refused(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(bad_inputs()["truncated_png"])


def test_mask_any_nonzero_pixel_is_defect():
    gray = np.array([[0, 1, 255]], np.uint8)
    mask = decode_mask(encode(Image.fromarray(gray), "PNG"))
    assert mask.dtype == bool
    assert mask.tolist() == [[False, True, True]]


def test_colour_mask_any_nonzero_channel_is_defect():
    rgb = np.array([[[0, 0, 0], [0, 0, 1], [255, 0, 0]]], np.uint8)
    mask = decode_mask(encode(Image.fromarray(rgb), "PNG"))
    assert mask.tolist() == [[False, True, True]]


def test_mask_bad_bytes_raise_decode_error_naming_the_mask():
    with pytest.raises(ImageDecodeError, match="gt/000_mask.png: not a recognised image"):
        decode_mask(b"not a mask", "gt/000_mask.png")


def test_load_image_reads_and_decodes_a_local_file(tmp_path):
    pixels = noise_rgb()
    path = tmp_path / "part.png"
    path.write_bytes(encode(Image.fromarray(pixels), "PNG"))
    np.testing.assert_array_equal(load_image(str(path)), pixels)


def test_load_image_decode_error_names_the_path(tmp_path):
    path = tmp_path / "part.png"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=f"{path}: empty file"):
        load_image(str(path))


# ---------------------------------------------------------------- reduced-scale JPEG decoding


def big_photo(width: int = 4000, height: int = 3000, mode: str = "RGB") -> Image.Image:
    """A smooth, photo-like image with a red block in the top-left corner."""
    small = np.random.default_rng(2).integers(0, 200, (30, 40, 3), dtype=np.uint8)
    small[:6, :8] = (255, 0, 0)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.NEAREST)
    return image.convert(mode)


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(big_photo(), "JPEG", quality=90)


def test_jpeg_with_a_target_decodes_reduced_but_never_below_the_target(big_jpeg):
    for target in [(750, 1000), (600, 700), (1000, 1000), (3000, 4000)]:
        decoded = decode_image(big_jpeg, target=target)
        height, width = decoded.shape[:2]
        assert_rgb(decoded, height, width)
        assert target[0] <= height <= 2 * target[0] and target[1] <= width <= 2 * target[1]
        assert height * 4 == width * 3  # the aspect is kept
    full = decode_image(big_jpeg)
    reduced = decode_image(big_jpeg, target=(750, 1000))
    assert reduced.shape == (750, 1000, 3)  # a quarter scale: 1/16 of the pixels
    # The same picture: the reduced decode matches the full one shrunk.
    shrunk = np.asarray(Image.fromarray(full).resize((1000, 750), Image.Resampling.BOX))
    assert np.abs(reduced.astype(int) - shrunk).mean() < 4
    red = (reduced[..., 0] > 200) & (reduced[..., 1] < 60)
    assert red[:60, :80].mean() > 0.9 and red.mean() < 0.05


def test_reduced_jpeg_decode_is_faster(big_jpeg):
    import time

    def best(**kwargs) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            decode_image(big_jpeg, **kwargs)
            times.append(time.perf_counter() - start)
        return min(times)

    # Measured 0.17 s full, 0.05 s at a quarter scale; loose, as machines are shared.
    assert best(target=(750, 1000)) < 0.8 * best()


def test_target_does_not_lift_the_pixel_limit(big_jpeg):
    with pytest.raises(ImageDecodeError, match="image is 4000x3000"):
        decode_image(big_jpeg, "big.jpg", max_pixels=4000 * 3000 - 1, target=(750, 1000))


def test_png_with_a_target_decodes_at_full_size():
    data = encode(big_photo(800, 600), "PNG")
    decoded = decode_image(data, target=(150, 200))
    np.testing.assert_array_equal(decoded, np.asarray(big_photo(800, 600)))


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_jpeg_with_a_target_comes_out_upright(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(big_photo(), "JPEG", quality=90, exif=exif.tobytes())
    full = decode_image(data)
    # The target is in the displayed orientation: 4000 high, 3000 wide when turned 90 degrees.
    target = (1000, 750) if orientation in (6, 8) else (750, 1000)
    reduced = decode_image(data, target=target)
    assert reduced.shape == (*target, 3)
    assert full.shape[0] * target[1] == full.shape[1] * target[0]
    shrunk = np.asarray(Image.fromarray(full).resize(target[::-1], Image.Resampling.BOX))
    assert np.abs(reduced.astype(int) - shrunk).mean() < 4
    # The red block of the stored top-left corner, where the rotation carries it.
    red = (reduced[..., 0] > 200) & (reduced[..., 1] < 60)
    h, w = target
    corner = {6: red[:h // 10, -w // 10:], 8: red[-h // 10:, :w // 10],
              3: red[-h // 10:, -w // 10:]}[orientation]
    assert corner.mean() > 0.9


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpeg_with_a_target_convert_as_in_a_full_decode(mode):
    data = encode(big_photo(mode=mode), "JPEG", quality=90)
    full = decode_image(data)
    reduced = decode_image(data, target=(750, 1000))
    assert_rgb(reduced, 750, 1000)
    shrunk = np.asarray(Image.fromarray(full).resize((1000, 750), Image.Resampling.BOX))
    assert np.abs(reduced.astype(int) - shrunk).mean() < 4


def test_a_bad_target_is_refused(big_jpeg):
    with pytest.raises(ValueError, match="target"):
        decode_image(big_jpeg, target=(0, 10))
