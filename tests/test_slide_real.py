"""Real slides from ../shared/data/slides: metadata and pixels agree with OpenSlide."""

from __future__ import annotations

import cv2
import numpy as np
import openslide
import pytest

from tests.conftest import shared_path
from tests.test_slide import assert_one_line_starting_with
from tests.test_slide_tiff import openslide_rgb
from tilscore.errors import MissingMppError, SlideOpenError, SlideReadError
from tilscore.slide import open_slide

pytestmark = pytest.mark.real_data

READABLE = ["CMU-1-Small-Region.svs", "small.svs", "unreadable.svs", "boxes.tiff", "boxes_0.dcm"]
TIFF_BASED = ["CMU-1-Small-Region.svs", "small.svs", "boxes.tiff"]
# Level-0 regions (x, y, w, h); the last two lie partly outside the slide (white padding).
REGIONS = {
    "CMU-1-Small-Region.svs": [(0, 0, 256, 256), (1000, 1500, 300, 200), (517, 2033, 128, 333),
                               (2100, 2850, 256, 256), (-40, -30, 128, 96)],
    "boxes.tiff": [(0, 0, 64, 64), (100, 50, 120, 90), (37, 171, 77, 41),
                   (250, 200, 100, 100), (-20, -10, 60, 60)],
}  # fmt: skip


def openslide_mpp(osr: openslide.OpenSlide) -> float | None:
    props = osr.properties
    if openslide.PROPERTY_NAME_MPP_X not in props:
        return None
    return (
        float(props[openslide.PROPERTY_NAME_MPP_X]) + float(props[openslide.PROPERTY_NAME_MPP_Y])
    ) / 2


@pytest.mark.parametrize("name", READABLE)
def test_metadata_matches_openslide(name):
    path = shared_path("slides", name)
    with openslide.OpenSlide(str(path)) as osr, open_slide(path) as slide:
        assert slide.level_dimensions == osr.level_dimensions
        assert slide.vendor == osr.properties[openslide.PROPERTY_NAME_VENDOR]
        assert slide._backend.metadata_mpp == pytest.approx(openslide_mpp(osr))
        assert set(slide.associated_images) == set(osr.associated_images)
        if name == "boxes.tiff":  # 72 dpi in the tags: 352.8 µm/px is no microscope
            with pytest.raises(MissingMppError, match="implausible.*--mpp"):
                _ = slide.mpp
        else:
            assert slide.mpp == pytest.approx(openslide_mpp(osr))


@pytest.mark.parametrize("name", TIFF_BASED)
def test_forced_tiff_backend_metadata(name):
    path = shared_path("slides", name)
    with openslide.OpenSlide(str(path)) as osr, open_slide(path, backend="tiff") as slide:
        assert slide._backend.__class__.__name__ == "TiffBackend"
        assert slide.level_dimensions == osr.level_dimensions
        assert slide._backend.metadata_mpp == pytest.approx(openslide_mpp(osr))
        assert set(slide.associated_images) == set(osr.associated_images)


def test_default_backends():
    kinds = {
        "CMU-1-Small-Region.svs": "OpenSlideBackend",
        "boxes.tiff": "TiffBackend",
        "boxes_0.dcm": "OpenSlideBackend",
    }
    for name, kind in kinds.items():
        with open_slide(shared_path("slides", name), mpp=0.5) as slide:
            assert slide._backend.__class__.__name__ == kind


@pytest.mark.parametrize("name", sorted(REGIONS))
@pytest.mark.parametrize("backend", [None, "tiff"], ids=["default", "tiff"])
def test_reads_match_openslide(name, backend):
    path = shared_path("slides", name)
    with open_slide(path, mpp=0.5, backend=backend) as slide:
        for x, y, w, h in REGIONS[name]:
            ours = slide.read(x, y, width=w, height=h)
            assert ours.shape == (h, w, 3) and ours.dtype == np.uint8
            diff = np.abs(ours.astype(float) - openslide_rgb(path, x, y, w, h)).mean()
            assert diff <= 1.0, ((x, y, w, h), diff)
            if x < 0:
                assert (ours[:-y, :-x] == 255).all()


@pytest.mark.parametrize("backend", [None, "tiff"], ids=["default", "tiff"])
def test_coarse_read_uses_lower_level(backend):
    path = shared_path("slides", "boxes.tiff")
    with open_slide(path, mpp=0.5, backend=backend) as slide:
        levels_read = []
        read_level = slide._backend.read_level
        slide._backend.read_level = lambda k, **kw: levels_read.append(k) or read_level(k, **kw)
        coarse = slide.read(0, 0, width=75, height=62, mpp=2.0)  # 4x the slide mpp
        assert coarse.shape == (62, 75, 3)
        assert levels_read and min(levels_read) >= 1
        full = slide.read(0, 0, width=300, height=248)
        expected = cv2.resize(full, (75, 62), interpolation=cv2.INTER_AREA).astype(float)
        assert np.abs(coarse.astype(float) - expected).mean() <= 6.0


def test_thumbnail_shape():
    with open_slide(shared_path("slides", "CMU-1-Small-Region.svs")) as slide:
        thumb = slide.thumbnail(8.0)
        scale = slide.mpp / 8.0
        assert thumb.shape == (round(2967 * scale), round(2220 * scale), 3)
        assert thumb.dtype == np.uint8


def test_broken_svs():
    for backend in (None, "openslide", "tiff"):
        with pytest.raises(SlideOpenError) as info:
            open_slide(shared_path("slides", "broken.svs"), backend=backend)
        assert_one_line_starting_with(info.value, "broken.svs")


@pytest.mark.parametrize("backend", [None, "openslide", "tiff"])
def test_unreadable_svs_opens_but_read_fails(backend):
    with open_slide(shared_path("slides", "unreadable.svs"), backend=backend) as slide:
        assert slide.dimensions == (16, 16)
        with pytest.raises(SlideReadError, match="cannot decode region") as info:
            width, height = slide.dimensions
            slide.read(0, 0, width=width, height=height)
        assert_one_line_starting_with(info.value, "unreadable.svs")


def test_small_svs_backends_agree():
    path = shared_path("slides", "small.svs")
    reads = [open_slide(path, backend=b).read(0, 0, width=16, height=16)
             for b in ("openslide", "tiff")]
    assert np.abs(reads[0].astype(float) - reads[1]).mean() <= 1.0


@pytest.mark.parametrize("backend", [None, "openslide"])
def test_boxes_every_level_matches_openslide(backend):
    path = shared_path("slides", "boxes.tiff")
    with openslide.OpenSlide(str(path)) as osr, open_slide(path, backend=backend) as slide:
        for level, (w, h) in enumerate(osr.level_dimensions):
            ours = slide._backend.read_level(level, x=0, y=0, width=w, height=h).astype(float)
            rgba = np.asarray(osr.read_region((0, 0), level, (w, h))).astype(float)
            reference = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
            assert np.abs(ours - reference).mean() <= 1.0, level
