"""Tests for cifar_flax.images: every input mode, orientation, frames and bad inputs."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from cifar_flax.images import ImageError, load_rgb32, load_rgb32_many, open_image, to_rgb_uint8

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def _rgb(image):
    return to_rgb_uint8(image)


# --- modes -----------------------------------------------------------------------------------


def test_rgb_passthrough():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = _rgb(Image.fromarray(pixels, "RGB"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, pixels)


def test_grayscale_l_replicates_channels():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = _rgb(Image.fromarray(gray, "L"))
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_rgba_composites_transparent_on_white():
    pixels = np.zeros((2, 2, 4), np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)  # opaque red
    pixels[0, 1] = (0, 0, 255, 0)  # fully transparent blue -> white
    pixels[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    out = _rgb(Image.fromarray(pixels, "RGBA"))
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 1]) == WHITE
    assert all(abs(int(v) - 127) <= 2 for v in out[1, 0])


def test_la_composites_on_white():
    pixels = np.array([[[0, 255], [0, 0]]], np.uint8)  # opaque black, transparent black
    out = _rgb(Image.fromarray(pixels, "LA"))
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == WHITE


def test_palette_p():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    out = _rgb(image)
    assert tuple(out[0, 0]) == RED and tuple(out[0, 1]) == (0, 255, 0)


def test_palette_with_transparency_composites_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    path = tmp_path / "transparent.png"
    image.save(path, transparency=0)  # palette index 0 (black) is transparent
    out = _rgb(open_image(path))
    assert tuple(out[0, 0]) == WHITE and tuple(out[0, 1]) == RED


def test_palette_pa_mode():
    image = Image.new("PA", (1, 1))
    image.putpalette([255, 0, 0] + [0] * 765)
    image.putpixel((0, 0), (0, 0))  # index 0, alpha 0 -> white
    assert tuple(_rgb(image)[0, 0]) == WHITE


def test_cmyk():
    image = Image.new("CMYK", (1, 2), (0, 255, 255, 0))  # no cyan, full magenta+yellow = red
    out = _rgb(image)
    assert out.shape == (2, 1, 3) and tuple(out[0, 0]) == RED


def test_16_bit_grayscale_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = open_image(path)
    assert image.mode.startswith("I")
    out = _rgb(image)
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_int32_and_float_modes():
    as_int = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
    np.testing.assert_array_equal(_rgb(as_int)[0, :, 1], [0, 255])
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    np.testing.assert_array_equal(_rgb(as_float)[0, :, 0], [0, 128, 255])


def test_bilevel_mode_1():
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    out = _rgb(image)
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == WHITE


# --- orientation and frames ------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)  # height 2, width 3
    pixels[0, 0] = RED
    image = Image.fromarray(pixels, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    image.save(path, exif=exif)
    out = _rgb(open_image(path))
    assert out.shape == (3, 2, 3)  # now portrait
    assert tuple(out[0, -1]) == RED  # top-left moved to top-right


def test_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in (RED, (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 2
    out = load_rgb32(path)
    assert out.shape == (32, 32, 3)
    assert np.all(out == np.array(RED, np.uint8))


# --- sources and resizing --------------------------------------------------------------------


def test_load_rgb32_from_files_and_resizes(tmp_path):
    for size, suffix in [((32, 32), "png"), ((64, 48), "png"), ((16, 16), "bmp"), ((100, 80), "jpg")]:
        path = tmp_path / f"img_{size[0]}.{suffix}"
        Image.new("RGB", size, (10, 200, 30)).save(path)
        out = load_rgb32(path)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - (10, 200, 30)).max() <= 3  # uniform colour survives


def test_load_rgb32_exact_pixels_for_32x32_png(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "exact.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(load_rgb32(str(path)), pixels)
    np.testing.assert_array_equal(load_rgb32(Image.open(path)), pixels)
    np.testing.assert_array_equal(load_rgb32(pixels), pixels)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.full((4, 4), 100, np.uint8), (100, 100, 100)),
        (np.full((4, 4, 1), 100, np.uint8), (100, 100, 100)),
        (np.full((4, 4, 3), (1, 2, 3), np.uint8), (1, 2, 3)),
        (np.full((4, 4, 4), (255, 0, 0, 0), np.uint8), WHITE),  # transparent -> white
        (np.full((4, 4), 65535, np.uint16), WHITE),
        (np.full((4, 4, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((4, 4, 3), 200.0, np.float64), (200, 200, 200)),
        (np.ones((4, 4), bool), WHITE),
    ],
)
def test_numpy_inputs(array, expected):
    out = to_rgb_uint8(open_image(array))
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == expected


def test_numpy_bad_shape_and_dtype():
    with pytest.raises(ImageError, match="shape"):
        open_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match="dtype"):
        open_image(np.zeros((4, 4), np.complex64))
    with pytest.raises(ImageError, match="Unsupported image source"):
        open_image(12345)


# --- bad inputs ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(missing)


def test_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        open_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg"):
        load_rgb32(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("definitely not an image\n")
    with pytest.raises(ImageError, match="notes.png"):
        load_rgb32(path)


def test_truncated_jpeg(tmp_path):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        load_rgb32(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12, 30])  # 144 px: Pillow only warns; 900 px: Pillow raises
def test_decompression_bomb(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="bomb.png"):
        open_image(path)


def test_image_error_is_value_error():
    assert issubclass(ImageError, ValueError)


def test_load_rgb32_many_counts_resized(tmp_path):
    paths = []
    for index, size in enumerate([(32, 32), (64, 64), (40, 20)]):
        path = tmp_path / f"{index}.jpg"
        Image.new("RGB", size, (200, 100, 50)).save(path, quality=95)
        paths.append(path)
    images, resized = load_rgb32_many(paths)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert resized == 2  # the 64x64 JPEG counts even though it decodes at 32x32 via draft
    assert np.abs(images.astype(int) - (200, 100, 50)).max() <= 3
