"""tifffile + zarr backend on synthetic TIFFs written here, incl. a JPEG 2000 Aperio SVS."""

from __future__ import annotations

import cv2
import numpy as np
import openslide
import pytest
import tifffile

from tests.test_slide import assert_one_line_starting_with, gradient_rgb
from tilscore.errors import NotBrightfieldError
from tilscore.slide import open_slide


def pyramid(image: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """[image, image/2, image/4, ...] area-downsampled, uint8 RGB."""
    levels = [image]
    for _ in range(n_levels - 1):
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    return levels


def write_subifd_pyramid(path, levels, mpp_um=0.5, **kwargs):
    """Tiled pyramidal TIFF: level 0 in the main IFD, reductions in SubIFDs."""
    res = 1e4 / mpp_um  # pixels per centimetre
    with tifffile.TiffWriter(path) as tw:
        opts = dict(tile=(64, 64), compression="zlib", resolutionunit="CENTIMETER", **kwargs)
        tw.write(levels[0], subifds=len(levels) - 1, resolution=(res, res), **opts)
        for k, level in enumerate(levels[1:], start=1):
            r = res / 2**k
            tw.write(level, subfiletype=1, resolution=(r, r), **opts)


def openslide_rgb(path, x, y, width, height, level=0):
    """OpenSlide read_region at level-0 (x, y) composited on white, as float (H, W, 3)."""
    with openslide.OpenSlide(str(path)) as osr:
        rgba = np.asarray(osr.read_region((x, y), level, (width, height))).astype(float)
    alpha = rgba[..., 3:] / 255.0
    return rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)


def test_subifd_pyramid_levels_and_pixels(tmp_path):
    levels = pyramid(gradient_rgb(300, 400), 3)
    path = tmp_path / "pyr.tif"
    write_subifd_pyramid(path, levels, photometric="rgb")
    with open_slide(path) as slide:
        assert slide._backend.__class__.__name__ == "TiffBackend"
        assert slide.vendor == "generic-tiff"
        assert slide.level_dimensions == ((400, 300), (200, 150), (100, 75))
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read(37, 11, width=150, height=170),
                                      levels[0][11:181, 37:187])
        for k in (1, 2):
            np.testing.assert_array_equal(
                slide._backend.read_level(k, x=5, y=3, width=40, height=30), levels[k][3:33, 5:45]
            )
        # 4x coarser: read from level 2, close to area-downsampling level 0.
        assert slide.best_level(4.0) == 2
        coarse = slide.read(0, 0, width=100, height=75, mpp=2.0)
        assert np.abs(coarse.astype(float) - levels[2]).mean() <= 1.0
        assert slide.thumbnail(8.0).shape == (19, 25, 3)


def test_planar_rgb_is_transposed(tmp_path):
    image = gradient_rgb(100, 130)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate",
                     tile=(64, 64), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    with open_slide(path) as slide:
        assert slide.dimensions == (130, 100)
        np.testing.assert_array_equal(slide.read(3, 4, width=100, height=90), image[4:94, 3:103])


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.dstack([gradient_rgb(64, 64), np.full((64, 64), 255, np.uint8)])
    rgba[:32, :, 3] = 0
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples="unassalpha", tile=(32, 32))
    region = open_slide(path, mpp=0.5).read(0, 0, width=64, height=64)
    assert (region[:32] == 255).all()
    np.testing.assert_array_equal(region[32:], rgba[32:, :, :3])


@pytest.mark.parametrize(
    ("unit", "resolution", "expected"),
    [("CENTIMETER", 4e4, 0.25), ("INCH", 25400 / 0.5, 0.5), ("NONE", 2.0, None)],
)
def test_resolution_units(tmp_path, unit, resolution, expected):
    path = tmp_path / "res.tif"
    tifffile.imwrite(path, gradient_rgb(64, 64), photometric="rgb", tile=(32, 32),
                     resolution=(resolution, resolution), resolutionunit=unit)  # fmt: skip
    slide = open_slide(path, backend="tiff")
    assert slide._backend.metadata_mpp == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(("size", "unit", "expected"), [(250, "nm", 0.25), (0.0005, "mm", 0.5)])
def test_ome_physical_size_units(tmp_path, size, unit, expected):
    path = tmp_path / "img.ome.tif"
    levels = pyramid(gradient_rgb(256, 256), 2)
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
            "PhysicalSizeY": size, "PhysicalSizeYUnit": unit}  # fmt: skip
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=1, tile=(64, 64), photometric="rgb", metadata=meta)
        tw.write(levels[1], subfiletype=1, tile=(64, 64), photometric="rgb")
    with open_slide(path) as slide:
        assert slide.vendor == "ome-tiff"
        assert slide.level_dimensions == ((256, 256), (128, 128))
        assert slide.mpp == pytest.approx(expected)
        np.testing.assert_array_equal(slide.read(0, 0, width=256, height=256), levels[0])


@pytest.mark.parametrize(
    ("data", "kwargs", "match"),
    [
        (np.zeros((64, 64, 3), np.uint16), {"photometric": "rgb"}, "16-bit"),
        (
            np.zeros((5, 64, 64), np.uint8),
            {"photometric": "minisblack", "planarconfig": "separate"},
            "5-channel|5 samples",
        ),
        (np.zeros((64, 64), np.uint8), {"photometric": "minisblack"}, "greyscale"),
    ],
    ids=["16-bit", "5-channel", "greyscale"],
)
def test_not_brightfield(tmp_path, data, kwargs, match):
    path = tmp_path / "fluo.tif"
    tifffile.imwrite(path, data, tile=(32, 32), **kwargs)
    for backend in (None, "tiff"):
        with pytest.raises(NotBrightfieldError, match=match) as info:
            open_slide(path, mpp=0.5, backend=backend)
        assert_one_line_starting_with(info.value, "fluo.tif")


def test_ome_multichannel_is_not_brightfield(tmp_path):
    path = tmp_path / "mplex.ome.tif"
    tifffile.imwrite(path, np.zeros((4, 64, 64), np.uint8), ome=True, tile=(32, 32),
                     metadata={"axes": "CYX"})  # fmt: skip
    with pytest.raises(NotBrightfieldError, match="4-channel"):
        open_slide(path, mpp=0.5)


def test_corrupt_tile_is_read_error(tmp_path):
    from tilscore.errors import SlideReadError

    path = tmp_path / "bad.tif"
    tifffile.imwrite(path, gradient_rgb(128, 128), photometric="rgb", tile=(64, 64),
                     compression="zlib")  # fmt: skip
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages[0].dataoffsets[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    slide = open_slide(path, mpp=0.5, backend="tiff")
    np.testing.assert_array_equal(slide.read(0, 0, width=64, height=64),
                                  gradient_rgb(128, 128)[:64, :64])
    with pytest.raises(SlideReadError, match=r"^bad.tif: cannot decode region at level 0"):
        slide.read(0, 0, width=128, height=128)


# -- JPEG 2000 Aperio SVS ---------------------------------------------------------------
def rgb_to_ycbcr(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> full-range (JFIF) YCbCr, as Aperio 33003 tiles hold it."""
    r, g, b = (image[..., k].astype(float) for k in range(3))
    ycc = [0.299 * r + 0.587 * g + 0.114 * b,
           128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
           128 + 0.5 * r - 0.418688 * g - 0.081312 * b]  # fmt: skip
    return np.clip(np.rint(np.stack(ycc, -1)), 0, 255).astype(np.uint8)


def write_jp2k_svs(path, image: np.ndarray, compression: int) -> None:
    """Aperio-style SVS: JPEG 2000 tiled level 0, stripped JPEG thumbnail, level 1.

    33005 = J2K codestream of RGB; 33003 = J2K of YCbCr without the codestream colour
    transform (OpenSlide converts to RGB). tifffile's own ``jpeg2000`` (34712) is not an
    Aperio compression and OpenSlide refuses it. ``metadata=None`` keeps tifffile from
    adding a second (JSON) ImageDescription, which would hide the Aperio one.
    """
    h, w = image.shape[:2]
    head = "Aperio Image Library v12.0.15\r\n"
    desc = f"{head}{w}x{h} [0,0 {w}x{h}] (256x256) J2K/KDU Q=70|AppMag = 20|MPP = 0.5"
    encode = rgb_to_ycbcr if compression == 33003 else (lambda a: a)
    args = {"level": 40, "mct": False} if compression == 33003 else {"level": 40}
    opts = dict(photometric="rgb", metadata=None)
    level1 = cv2.resize(image, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    thumb = cv2.resize(image, (w // 8, h // 8), interpolation=cv2.INTER_AREA)
    tiles = dict(tile=(256, 256), compression=compression, compressionargs=args, **opts)
    with tifffile.TiffWriter(path) as tw:
        tw.write(encode(image), description=desc, **tiles)
        thumb_desc = f"{head}{w}x{h} -> {w // 8}x{h // 8} - "
        tw.write(thumb, compression="jpeg", rowsperstrip=16, description=thumb_desc, **opts)
        tw.write(encode(level1), description=f"{head}{w}x{h} -> {w // 4}x{h // 4} - ", **tiles)


@pytest.mark.parametrize("compression", [33005, 33003], ids=["jp2k-rgb", "jp2k-ycbcr"])
def test_jpeg2000_svs_matches_openslide(tmp_path, compression):
    h, w = 700, 900
    image = cv2.GaussianBlur(gradient_rgb(h, w), (0, 0), 1.5)
    path = tmp_path / "j2k.svs"
    write_jp2k_svs(path, image, compression)
    if openslide.OpenSlide.detect_format(str(path)) != "aperio":
        pytest.skip("OpenSlide does not see the tifffile-written JPEG 2000 SVS as Aperio")
    regions = [(0, 0, 256, 256), (200, 300, 300, 200), (800, 600, 200, 200)]
    for backend in (None, "tiff"):
        with open_slide(path, backend=backend) as slide:
            assert slide.vendor == "aperio"
            assert slide.level_dimensions == ((900, 700), (225, 175))
            assert slide.mpp == pytest.approx(0.5)
            for x, y, rw, rh in regions:
                ours = slide.read(x, y, width=rw, height=rh).astype(float)
                diff = np.abs(ours - openslide_rgb(path, x, y, rw, rh)).mean()
                assert diff <= 1.0, (backend, (x, y), diff)
            level1 = slide._backend.read_level(1, x=10, y=20, width=150, height=100).astype(float)
            assert np.abs(level1 - openslide_rgb(path, 40, 80, 150, 100, level=1)).mean() <= 1.0


def test_one_corrupt_svs_tile_does_not_poison_the_slide(tmp_path):
    """OpenSlide leaves a handle in error state after a decode error; the backend reopens
    it, so the loader loses only the tiles that touch the corrupt file tile."""
    from tilscore.errors import SlideReadError
    from tilscore.prepare.tiles import LoaderStats, TileSpec, iter_tile_batches, tile_grid

    h, w = 1024, 1024
    image = gradient_rgb(h, w)
    path = tmp_path / "bad.svs"
    head = "Aperio Image Library v12.0.15\r\n"
    desc = f"{head}{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = 0.5"
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, description=desc, tile=(256, 256), compression="jpeg",
                 photometric="rgb", metadata=None)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    with open(path, "r+b") as fh:  # file tile (row 1, col 1): replace its JPEG data
        fh.seek(offset + 2)
        fh.write(b"\x00" * (count - 4))
    if openslide.OpenSlide.detect_format(str(path)) != "aperio":
        pytest.skip("OpenSlide does not see the test SVS as Aperio")
    with open_slide(path) as slide:
        assert slide.vendor == "aperio"
        with pytest.raises(SlideReadError):
            slide.read(256, 256, width=256, height=256)
        assert slide.read(768, 768, width=64, height=64).shape == (64, 64, 3)  # handle works again
        grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(0.5, 256, 0))
        stats = LoaderStats()
        n = sum(len(b.index) for b in iter_tile_batches(slide, grid, batch_size=4,
                                                        workers=2, stats=stats))
    assert n == 15 and len(stats.failed_tiles) == 1
