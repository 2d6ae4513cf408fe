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


def _smooth_embryo_like(side: int) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side] / side
    disc = ((xx - 0.5) ** 2 + (yy - 0.45) ** 2 < 0.12).astype(float)
    texture = 40 * np.sin(xx * 23) * np.cos(yy * 17)
    gray = np.clip(90 + 80 * disc + texture, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def test_reduced_jpeg_decode_keeps_min_side_and_pixels(tmp_path: Path) -> None:
    from embryo_ml.data.preprocess import DECODE_MIN_SIDE, decode_side, load_square, resize_square

    image = _smooth_embryo_like(500)
    jpeg = write_image(tmp_path / "e.jpg", image, quality=90)
    full = read_image(jpeg)
    assert full.shape == (500, 500, 3)
    # 1/2 keeps >= 224, 1/4 would not; 1/4 is the smallest scale above the 128 px floor
    assert read_image(jpeg, min_side=224).shape == (250, 250, 3)
    assert read_image(jpeg, min_side=100).shape == (125, 125, 3)
    assert decode_side(64) == DECODE_MIN_SIDE and decode_side(300) == 300
    assert read_image(jpeg, min_side=decode_side(64)).shape == (250, 250, 3)
    assert read_image(jpeg, min_side=600).shape == (500, 500, 3)  # never enlarged
    # the reduced decode averages like INTER_AREA: model-size pixels stay within a few levels
    reduced = load_square(jpeg, 224)
    exact = resize_square(full, 224)
    assert reduced.shape == exact.shape
    assert np.abs(reduced.astype(int) - exact.astype(int)).mean() < 2.0
    # other formats ignore the hint
    png = write_image(tmp_path / "e.png", image)
    assert read_image(png, min_side=128).shape == (500, 500, 3)


def _pillow_reference(path: Path, min_side: int | None) -> np.ndarray:
    """What Pillow alone decodes: the reader's result before the OpenCV path existed."""
    with Image.open(path) as image:
        if min_side:
            image.draft(image.mode, (min_side, min_side))
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("kind", ["rgb420", "rgb444", "grey", "progressive"])
def test_jpeg_decoded_by_opencv_gives_pillows_pixels(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embryo_ml.data import images

    used = []
    original = images._decode_jpeg

    def recording(*args: object) -> np.ndarray | None:
        decoded = original(*args)
        used.append(decoded is not None)
        return decoded

    monkeypatch.setattr(images, "_decode_jpeg", recording)
    rgb = _smooth_embryo_like(500)
    rgb[..., 1] = np.roll(rgb[..., 1], 7, axis=1)  # colour, so chroma matters
    picture = Image.fromarray(rgb[..., 0] if kind == "grey" else rgb)
    options = {"rgb444": {"subsampling": 0}, "progressive": {"progressive": True}}.get(kind, {})
    path = tmp_path / f"{kind}.jpg"
    picture.save(path, quality=88, **options)
    for min_side in (None, 60, 128, 224, 600):
        out = read_image(path, min_side=min_side)
        assert out.flags.c_contiguous and out.shape[2] == 3
        assert np.array_equal(out, _pillow_reference(path, min_side)), min_side
    assert used == [True] * 5  # every decode took the OpenCV path


def test_jpeg_opencv_path_declines_what_pillow_must_handle(tmp_path: Path) -> None:
    from embryo_ml.data import images

    path = write_image(tmp_path / "e.jpg", _smooth_embryo_like(64), quality=90)
    data = path.read_bytes()
    assert images._decode_jpeg(data, (64, 64), "RGB", None) is not None
    assert images._decode_jpeg(data[:-300], (64, 64), "RGB", None) is None  # no end marker
    assert images._decode_jpeg(data, (64, 64), "CMYK", None) is None
    assert images._decode_jpeg(data, (65, 64), "RGB", None) is None  # not the header's size
    # trailing bytes after the end marker: Pillow decodes it, same pixels
    (tmp_path / "tail.jpg").write_bytes(data + b"\x00" * 16)
    assert np.array_equal(read_image(tmp_path / "tail.jpg"), read_image(path))
    # in memory, the same path and the same pixels
    assert np.array_equal(images.read_image_bytes(data, min_side=32),
                          read_image(path, min_side=32))
