"""Tissue detection against exact synthetic truth, pen marks, and a real slide."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import shared_path
from tilscore.prepare.tissue import TissueMask, pen_mask, tissue_mask, tissue_mask_from_thumbnail
from tilscore.synth.scene import SyntheticScene

MASK_MPP = 8.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _scene_mask(stain: str, seed: int, pen: bool) -> tuple[TissueMask, np.ndarray]:
    scene = SyntheticScene(8192, 8192, mpp=0.25, stain=stain, seed=seed, pen_marks=pen)
    ds = MASK_MPP / scene.mpp
    side = int(8192 / ds)
    thumb = scene.render(0, 0, width=side, height=side, downsample=ds, supersample_um=4.0)
    return tissue_mask_from_thumbnail(thumb, MASK_MPP), scene.tissue_mask(MASK_MPP)


@pytest.mark.parametrize("stain,seed", [("he", 1), ("cd20", 3)])
def test_synthetic_tissue_iou(stain, seed):
    mask, truth = _scene_mask(stain, seed, pen=False)
    assert mask.mask.shape == truth.shape
    assert _iou(mask.mask, truth) >= 0.95
    assert mask.pen_fraction == 0.0


def test_pen_marks_are_excluded():
    mask, truth = _scene_mask("he", 2, pen=True)  # truth = tissue and not ink
    assert _iou(mask.mask, truth) >= 0.95
    assert mask.pen_fraction > 0.05


def test_blank_glass_has_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(244, 2, (200, 200, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask_from_thumbnail(glass, MASK_MPP).mask.any()


def test_pale_tissue_on_darker_glass_is_found():
    img = np.full((200, 200, 3), (232, 232, 234), np.uint8)  # greyish scan background
    img[50:150, 50:150] = (215, 200, 222)  # pale pink-purple tissue
    mask = tissue_mask_from_thumbnail(img, MASK_MPP).mask
    assert mask[60:140, 60:140].all() and not mask[:40].any()


def test_isolated_dark_nuclei_are_not_pen():
    img = np.full((100, 100, 3), (210, 150, 220), np.uint8)
    img[::9, ::7] = (40, 30, 90)  # scattered dark nuclei at thumbnail scale
    assert pen_mask(img)[::9, ::7].all()  # the colour rule alone flags them ...
    mask = tissue_mask_from_thumbnail(img, MASK_MPP)
    assert mask.pen_fraction == 0.0 and mask.mask.mean() > 0.95  # ... size removes them


def test_small_image_of_tissue_is_tissue_but_dust_on_a_slide_is_not():
    """A 128 µm tile (16 x 16 px at 8 µm/px, 0.016 mm²) is below the 0.02 mm² dust limit
    but fills its image: it is tissue. The same patch on a slide-sized field is dust."""
    tile = np.full((16, 16, 3), (190, 160, 200), np.uint8)
    assert tissue_mask_from_thumbnail(tile, MASK_MPP).mask.all()
    slide = np.full((200, 200, 3), (244, 244, 244), np.uint8)
    slide[20:36, 20:36] = (190, 160, 200)
    assert not tissue_mask_from_thumbnail(slide, MASK_MPP).mask.any()
    slide[100:140, 100:140] = (190, 160, 200)  # 0.1 mm², a real piece
    assert tissue_mask_from_thumbnail(slide, MASK_MPP).mask[100:140, 100:140].all()


@pytest.mark.real_data
def test_real_svs_tissue_fraction_is_plausible():
    from tilscore.slide import open_slide

    with open_slide(shared_path("slides", "CMU-1-Small-Region.svs")) as slide:
        mask = tissue_mask(slide)
    # The ROI is a strip of skin tissue on glass: roughly 30–60 % of the field.
    assert 0.25 < mask.fraction < 0.65
    assert mask.pen_fraction < 0.01


def test_mask_pixel_size_is_the_thumbnails_real_one(tmp_path):
    """A 1000 px image at 0.5 µm/px has a 62 px thumbnail at 8 µm/px (rounded): the mask
    must say 500/62 µm per pixel, or tiles and areas near the far edges drift by ~4 µm
    (tissue area -1.6 % here)."""
    from PIL import Image

    from tilscore.slide import open_slide

    rgb = np.full((1000, 1000, 3), (200, 120, 170), np.uint8)  # pink: tissue everywhere
    Image.fromarray(rgb).save(tmp_path / "roi.png")
    with open_slide(tmp_path / "roi.png", mpp=0.5) as slide:
        assert slide.thumbnail_size(8.0) == (62, 62)
        assert slide.thumbnail_mpp(8.0) == pytest.approx(500 / 62)
        mask = tissue_mask(slide, 8.0)
    assert mask.mask.shape == (62, 62)
    assert mask.mask.shape[1] * mask.mpp == pytest.approx(500.0)
    assert mask.area_mm2 == pytest.approx(0.25)
