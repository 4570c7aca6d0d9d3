"""open_slide dispatch, bad inputs, plain images and the numpy array backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import tilscore
from tilscore.errors import (
    MissingMppError,
    NotBrightfieldError,
    SlideOpenError,
    TilscoreError,
    UsageError,
)
from tilscore.slide import BACKENDS, Backend, Slide, open_slide


def gradient_rgb(height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) test image with structure on every axis and channel."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     ((x // 7 + y // 5) % 2) * 200 + 20], -1).astype(np.uint8)  # fmt: skip


def assert_one_line_starting_with(err: BaseException, name: str) -> None:
    text = str(err)
    assert text.startswith(name), text
    assert "\n" not in text, text


# -- array backend ----------------------------------------------------------------------
def test_array_round_trip():
    image = gradient_rgb(120, 160)
    with open_slide(image, mpp=0.5) as slide:
        assert isinstance(slide, Slide)
        assert slide.vendor == "array"
        assert slide.dimensions == (160, 120)
        assert slide.mpp == 0.5 and slide.mpp_source == "override"
        np.testing.assert_array_equal(slide.read(10, 20, width=50, height=30), image[20:50, 10:60])


def test_backends_implement_the_protocol(tmp_path):
    path = tmp_path / "roi.tif"
    tifffile.imwrite(path, gradient_rgb(16, 16), photometric="rgb")
    readers = [open_slide(gradient_rgb(8, 8), mpp=0.5), open_slide(path, mpp=0.5)]
    readers.append(open_slide(path, mpp=0.5, backend="image"))
    for slide in readers:
        assert isinstance(slide._backend, Backend)


def test_array_reads_outside_are_white():
    image = gradient_rgb(40, 60)
    slide = open_slide(image, mpp=0.5)
    region = slide.read(-10, -5, width=30, height=20)
    assert (region[:5] == 255).all() and (region[:, :10] == 255).all()
    np.testing.assert_array_equal(region[5:, 10:], image[:15, :20])
    assert (slide.read(100, 100, width=8, height=8) == 255).all()


def test_array_read_at_half_resolution():
    image = gradient_rgb(64, 96)
    slide = open_slide(image, mpp=0.5)
    half = slide.read(0, 0, width=48, height=32, mpp=1.0)
    assert half.shape == (32, 48, 3) and half.dtype == np.uint8
    expected = image.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    assert np.abs(half.astype(float) - expected).mean() <= 0.6


def test_array_thumbnail_shape():
    slide = open_slide(gradient_rgb(100, 200), mpp=0.5)
    assert slide.thumbnail(2.0).shape == (25, 50, 3)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4, 4), np.uint8)],
)
def test_array_rejects_wrong_dtype_or_shape(bad):
    with pytest.raises(UsageError, match="uint8"):
        open_slide(bad, mpp=0.5)


def test_array_needs_mpp():
    with pytest.raises(UsageError, match="mpp"):
        open_slide(gradient_rgb(8, 8))


# -- options ----------------------------------------------------------------------------
def test_unknown_backend_lists_valid_names(tmp_path):
    with pytest.raises(UsageError) as info:
        open_slide(tmp_path / "x.svs", backend="bioformats")
    for name in BACKENDS:
        assert name in str(info.value)


def test_implausible_mpp_override_is_usage_error():
    with pytest.raises(UsageError, match="implausible"):
        open_slide(gradient_rgb(8, 8), mpp=100)


def test_top_level_open_slide(tmp_path):
    path = tmp_path / "roi.png"
    Image.fromarray(gradient_rgb(30, 40)).save(path)
    with tilscore.open_slide(path, mpp=0.25) as slide:
        assert slide.dimensions == (40, 30)


# -- bad inputs -------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file") as info:
        open_slide(tmp_path / "missing.svs")
    assert_one_line_starting_with(info.value, "missing.svs")


def test_directory(tmp_path):
    with pytest.raises(SlideOpenError, match="folder"):
        open_slide(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.svs"
    os.mkfifo(path)
    with pytest.raises(SlideOpenError, match="not a regular file"):
        open_slide(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty file") as info:
        open_slide(path)
    assert_one_line_starting_with(info.value, "empty.svs")


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_text_file(tmp_path, backend):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n" * 50)
    with pytest.raises(SlideOpenError) as info:
        open_slide(path, backend=backend)
    assert_one_line_starting_with(info.value, "notes.svs")
    if backend is None:
        assert "not a slide or image tilscore can read (supported:" in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_tiff(tmp_path, keep):
    """Tiles past the end (keep half) or a cut IFD (keep 2%): SlideOpenError at open."""
    path = tmp_path / "cut.tif"
    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, noise, tile=(128, 128), compression="zlib", photometric="rgb")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TilscoreError) as info:
        with open_slide(path, mpp=0.5) as slide:
            slide.read(0, 0, width=512, height=512)
    assert isinstance(info.value, SlideOpenError)
    assert_one_line_starting_with(info.value, "cut.tif")


def test_truncated_png(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(SlideOpenError) as info:
        open_slide(path, mpp=0.5)
    assert_one_line_starting_with(info.value, "cut.png")


# -- plain images -----------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".png", ".bmp", ".jpg"])
def test_plain_image_reads(tmp_path, suffix):
    image = gradient_rgb(50, 70)
    path = tmp_path / f"roi{suffix}"
    Image.fromarray(image).save(
        path, **({"quality": 95, "subsampling": 0} if suffix == ".jpg" else {})
    )
    with open_slide(path, mpp=0.5) as slide:
        assert slide.vendor == "image" and slide.level_dimensions == ((70, 50),)
        tolerance = 3.0 if suffix == ".jpg" else 0.0
        region = slide.read(0, 0, width=70, height=50).astype(float)
        assert np.abs(region - image).mean() <= tolerance


def test_png_without_mpp_asks_for_mpp(tmp_path):
    path = tmp_path / "roi.png"
    Image.fromarray(gradient_rgb(20, 20)).save(path)
    slide = open_slide(path)
    assert slide.mpp_source is None
    with pytest.raises(MissingMppError, match="--mpp"):
        _ = slide.mpp


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 0
    rgba[5:, :, 3] = 255
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    region = open_slide(path, mpp=0.5).read(0, 0, width=10, height=10)
    assert (region[:5] == 255).all()
    assert (region[5:] == (200, 0, 0)).all()


@pytest.mark.parametrize("mode", ["I;16", "L"])
def test_non_rgb_png_is_not_brightfield(tmp_path, mode):
    dtype = np.uint16 if mode == "I;16" else np.uint8
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((16, 16), 1000 if mode == "I;16" else 100, dtype)).save(path)
    with pytest.raises(NotBrightfieldError) as info:
        open_slide(path, mpp=0.5)
    assert_one_line_starting_with(info.value, "grey.png")


@pytest.mark.parametrize("limit", [1000, 6000])  # 10,000 px: beyond 2x the limit; within
def test_decompression_bomb_is_one_clear_line_and_no_pillow_warning(tmp_path, monkeypatch,
                                                                     limit, capsys):
    """Between 1x and 2x Pillow's limit a PNG printed Pillow's raw DecompressionBombWarning
    and was decoded whole; beyond it the error named a Python attribute."""
    import warnings

    from tilscore.cli import main

    path = tmp_path / "big.png"
    Image.fromarray(gradient_rgb(100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SlideOpenError) as info:
            open_slide(path, mpp=0.5)
        assert main(["score", str(path), "--mpp", "0.5", "--out", str(tmp_path / "out"),
                     "--device", "cpu", "-q", "--no-report"]) == 1
    assert_one_line_starting_with(info.value, "big.png")
    assert "plain image too large (" in str(info.value)
    assert ("10,000 pixels" if limit == 1000 else "100 x 100 px") in str(info.value)
    assert f"at most {limit:,} pixels" in str(info.value)
    assert "tiled pyramidal TIFF" in str(info.value)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    err = capsys.readouterr().err
    assert err.startswith("tilscore: error: big.png: plain image too large") and \
        err.count("\n") == 1 and "Warning" not in err


def test_forced_image_backend_on_tiff(tmp_path):
    image = gradient_rgb(40, 50)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")  # fmt: skip
    with open_slide(path, backend="image") as slide:
        assert slide.vendor == "image"
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read(0, 0, width=50, height=40), image)


def test_stripped_tiff_goes_to_tiff_backend(tmp_path):
    image = gradient_rgb(60, 80)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, photometric="rgb", rowsperstrip=7, compression="zlib")
    with open_slide(path, mpp=0.5) as slide:
        assert slide._backend.__class__.__name__ == "TiffBackend"
        np.testing.assert_array_equal(slide.read(5, 9, width=70, height=40), image[9:49, 5:75])


def test_importing_the_package_loads_no_backend_library():
    code = (
        "import sys, tilscore.slide; "
        "heavy = {'openslide', 'tifffile', 'zarr', 'PIL', 'wsidicom', 'pydicom', 'cv2'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo
    )
    assert out.stdout.strip() == "[]"
