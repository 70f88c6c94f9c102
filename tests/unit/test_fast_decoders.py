"""The fastest decoder per file: which one takes each format, Pillow's pixels from each, and the
same error for every bad input as Pillow alone gives."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anomaly_core.data import decode
from anomaly_core.data.decode import (
    DECODER_ENV,
    ImageDecodeError,
    decode_image,
    decoder_for,
    read_image,
)
from tests.unit.test_decode import bad_inputs, big_photo, encode, noise_rgb, png_16bit


def oriented_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=90, exif=exif.tobytes())


def png_with_exif(pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())


RGB = noise_rgb(37, 53)
FILES = {
    # name: (bytes, decoder)
    "png rgb": (encode(Image.fromarray(RGB), "PNG"), "pyspng"),
    "png gray": (encode(Image.fromarray(RGB[..., 0]), "PNG"), "pyspng"),
    "png rgba": (encode(Image.fromarray(np.dstack([RGB, RGB[..., :1]])), "PNG"), "pyspng"),
    "png gray+alpha": (encode(Image.fromarray(RGB[..., 0]).convert("LA"), "PNG"), "pyspng"),
    "png 16-bit": (png_16bit(RGB.astype(np.uint16) * 257), "pillow"),
    "png palette": (encode(Image.fromarray(RGB).convert("P"), "PNG"), "pillow"),
    "png transparency key": (encode(Image.fromarray(RGB), "PNG", transparency=(0, 0, 0)),
                             "pillow"),
    "png exif": (png_with_exif(RGB), "pillow"),
    "png 1-bit": (encode(Image.fromarray(RGB[..., 0] > 127), "PNG"), "pillow"),
    "jpeg rgb": (encode(Image.fromarray(RGB), "JPEG", quality=90), "simplejpeg"),
    "jpeg gray": (encode(Image.fromarray(RGB[..., 0]), "JPEG", quality=90), "simplejpeg"),
    "jpeg progressive": (encode(Image.fromarray(RGB), "JPEG", progressive=True), "simplejpeg"),
    "jpeg 4:4:4": (encode(Image.fromarray(RGB), "JPEG", subsampling=0), "simplejpeg"),
    "jpeg upright exif": (oriented_jpeg(RGB, 1), "simplejpeg"),
    "jpeg rotated": (oriented_jpeg(RGB, 6), "pillow"),
    "jpeg cmyk": (encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), "pillow"),
    "tiff": (encode(Image.fromarray(RGB), "TIFF"), "pillow"),
    "bmp": (encode(Image.fromarray(RGB), "BMP"), "pillow"),
}


def pillow_only(fn, *args, **kwargs):
    """fn's result, or the error it raised, with every file decoded by Pillow."""
    import os

    saved = os.environ.get(DECODER_ENV)
    os.environ[DECODER_ENV] = "pillow"
    try:
        return fn(*args, **kwargs)
    except ImageDecodeError as err:
        return err
    finally:
        if saved is None:
            del os.environ[DECODER_ENV]
        else:
            os.environ[DECODER_ENV] = saved


def chosen(data: bytes) -> str:
    return decoder_for(decode._open(data, "x", decode.MAX_PIXELS), data)


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_format_goes_to_its_decoder(name):
    data, decoder = FILES[name]
    assert chosen(data) == decoder
    assert pillow_only(chosen, data) == "pillow"


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_decoder_gives_pillows_pixels(name):
    # Stated tolerance: none. libspng and libjpeg-turbo (islow DCT, fancy upsampling, as in
    # Pillow's libjpeg-turbo) give the very same pixels at full size.
    data, _ = FILES[name]
    np.testing.assert_array_equal(decode_image(data), pillow_only(decode_image, data))


@pytest.mark.parametrize("side, target", [(2048, 256), (1000, 256), (512, 224), (640, 480),
                                          (300, 256)])
def test_a_jpeg_scaled_in_the_dct_domain_is_pillows_draft(side, target):
    # The scale is Pillow's draft's (1/8, 1/4, 1/2 or 1, never below the target), and so are
    # the pixels; libjpeg-turbo's other n/8 scales would differ by 3 levels on average here.
    data = encode(big_photo(side, side), "JPEG", quality=90)
    ours = decode_image(data, target=(target, target))
    np.testing.assert_array_equal(ours, pillow_only(decode_image, data, target=(target, target)))
    assert min(ours.shape[:2]) >= target


@pytest.mark.parametrize("kind", sorted(bad_inputs()))
def test_a_bad_file_gets_the_same_error_as_with_pillow_alone(kind):
    data = bad_inputs()[kind]
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, "s3://b/x.png")
    assert str(caught.value) == str(pillow_only(decode_image, data, "s3://b/x.png"))


def test_a_truncated_jpeg_at_reduced_scale_is_still_an_error():
    data = encode(big_photo(800, 800), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) * 2 // 3], "cut.jpg", target=(100, 100))


def test_without_the_fast_wheels_pillow_decodes_everything(monkeypatch):
    monkeypatch.setattr(decode, "_FAST", {"pyspng": None, "simplejpeg": None})
    for name, (data, _) in FILES.items():
        assert chosen(data) == "pillow", name
    np.testing.assert_array_equal(decode_image(FILES["png rgb"][0]), RGB)


def test_read_image_decodes_a_png_once(tmp_path, monkeypatch):
    # Asking Pillow for a PNG's EXIF decodes all its pixels: the read stage must not.
    path = tmp_path / "a.png"
    path.write_bytes(FILES["png rgb"][0])
    loads = []
    real_load = Image.Image.load

    def counted(self):
        loads.append(self.format)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", counted)
    from PIL import PngImagePlugin
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counted)
    row = read_image(str(path), (16, 16))
    assert row["error"] is None and (row["height"], row["width"]) == (37, 53)
    assert loads.count("PNG") == 0  # libspng decoded it; Pillow only read the header


def test_a_png_damaged_in_storage_is_an_error_not_other_pixels():
    # libspng, as pyspng runs it, checks no checksum: one flipped byte of an uncompressed PNG
    # decoded to 9 wrong pixels and no error. The chunk CRCs are checked first, so Pillow
    # gives its error, as it always did.
    data = bytearray(encode(Image.fromarray(noise_rgb(64, 64)), "PNG", compress_level=0))
    data[500] ^= 0xFF
    with pytest.raises(ImageDecodeError, match="damaged.png: cannot decode PNG"):
        decode_image(bytes(data), "damaged.png")
