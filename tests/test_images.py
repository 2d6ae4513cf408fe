"""The one image reader: every format a clinic exports, and a clear refusal for the rest."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embryo_ml.data.images import read_image
from embryo_ml.errors import ImageReadError
from tests.conftest import write_image

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_gray_8bit_becomes_rgb(tmp_path: Path, suffix: str) -> None:
    out = read_image(write_image(tmp_path / f"g{suffix}", GRAY))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:, :, 0], GRAY) and np.array_equal(out[:, :, 2], GRAY)


def test_rgb_png_and_jpeg(tmp_path: Path) -> None:
    assert np.array_equal(read_image(write_image(tmp_path / "c.png", RGB)), RGB)
    jpeg = read_image(write_image(tmp_path / "c.jpg", RGB, quality=95))
    assert jpeg.shape == RGB.shape


def test_16bit_scaled_by_range(tmp_path: Path) -> None:
    data = np.linspace(0, 65535, 600, dtype=np.uint16).reshape(20, 30)
    path = tmp_path / "deep.png"
    Image.fromarray(data).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    expected = np.round(data.astype(float) / 65535 * 255)
    assert np.abs(out[:, :, 0] - expected).max() <= 1


def test_rgba_and_palette(tmp_path: Path) -> None:
    rgba = np.dstack([RGB, np.full((20, 30), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # transparent pixel composites on black
    out = read_image(write_image(tmp_path / "a.png", rgba))
    assert out.shape == (20, 30, 3) and tuple(out[0, 0]) == (0, 0, 0)
    assert np.array_equal(out[5, 5], RGB[5, 5])
    palette = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (20, 30, 3)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    image = Image.fromarray(RGB)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "o.jpg", exif=exif, quality=95)
    assert read_image(tmp_path / "o.jpg").shape == (30, 20, 3)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("notes.jpg", b"this is a text file, not a picture\n" * 5, "not a readable image"),
    ],
)
def test_refusals_name_the_file(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert info.value.path == str(path) and name in str(info.value)


def test_truncated_jpeg_refused(tmp_path: Path) -> None:
    path = write_image(tmp_path / "cut.jpg", RGB, quality=95)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(path)


def test_missing_and_oversized(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")
    path = write_image(tmp_path / "big.png", RGB)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path, max_pixels=100)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.fromarray(RGB).convert("CMYK").save(tmp_path / "k.jpg", quality=95)
    out = read_image(tmp_path / "k.jpg")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8


def test_16bit_tiff_and_multipage_tiff(tmp_path: Path) -> None:
    data = np.linspace(0, 4095, 600, dtype=np.uint16).reshape(20, 30)  # 12-bit camera data
    Image.fromarray(data).save(tmp_path / "deep.tif")
    out = read_image(tmp_path / "deep.tif")
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # scaled by the 12-bit range
    pages = [Image.fromarray(GRAY), Image.fromarray(255 - GRAY)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.warns(UserWarning, match="2 pages, using the first"):
        first = read_image(tmp_path / "stack.tif")
    assert np.array_equal(first[:, :, 0], GRAY)
