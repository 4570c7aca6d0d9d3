"""Tissue detection on a low-resolution thumbnail.

Brightfield background is bright and unsaturated; stained tissue (H&E or IHC
counterstain, even pale) absorbs light, i.e. has optical density (OD) above the glass.
The glass OD is measured on the slide itself (the brightest pixels), so a darker scan
background or a pale IHC counterstain both work; Otsu is *not* used because on a
tissue-rich thumbnail it splits tumour from stroma rather than tissue from glass. Pen ink
is removed by colour, keeping only stroke-sized components (isolated dark nuclei are
not ink), then morphology cleans up: closing merges nuclei-speckled tissue, small
specks and dust go, holes (bubbles, vessel lumina) are filled up to a size.
Everything runs on a thumbnail at ~8 µm/px (a 25 x 20 mm slide is
3125 x 2500 px), so cost is negligible next to reading the slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# µm/px of the coarse grid: the thumbnail the tissue mask is computed on (and the overlay
# of large slides), and the default grid of the tumour bulk (ScoreConfig.coarse_mpp)
COARSE_MPP = 8.0
# OD is summed over RGB (natural log). Glass scans at OD ~0.03–0.25; the glass level is
# the 2nd percentile of the thumbnail's OD unless that is implausibly dark (no glass in
# view), in which case GLASS_OD_DEFAULT is assumed.
GLASS_OD_PERCENTILE = 2.0
GLASS_OD_DEFAULT = 0.06
GLASS_OD_MAX = 0.30
TISSUE_OD_MARGIN = 0.06  # tissue absorbs at least this much more than the glass
MIN_TISSUE_SATURATION = 0.03  # stained tissue has some colour; grey dust/shadows do not
DENSE_OD_MARGIN = 0.40  # ... unless it absorbs strongly (dense haematoxylin/DAB)
CLOSING_UM = 16.0  # merges tissue broken up by pale lumina at thumbnail scale
MIN_TISSUE_AREA_UM2 = 0.02e6  # 0.02 mm²: smaller components are dust/debris ...
MIN_TISSUE_IMAGE_FRACTION = 0.25  # ... unless they fill this much of a small image (an ROI
# or tile of 0.1 x 0.1 mm is all tissue, but smaller than the dust limit)
MAX_HOLE_AREA_UM2 = 0.05e6  # 0.05 mm²: larger holes are real gaps, not bubbles/lumina
MIN_PEN_AREA_UM2 = 0.02e6  # ink strokes are ≥ ~100 µm wide and long; nuclei clusters are not
PEN_DILATION_UM = 16.0  # ink edges blend with tissue: grow the pen mask a little


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue grid. ``mask[i, j]`` covers level-0 µm [j*mpp, (j+1)*mpp) etc.

    ``mask``: bool (H, W); ``mpp``: µm per mask pixel (both axes);
    ``pen_fraction``: fraction of the thumbnail's non-background area covered by pen ink.
    """

    mask: np.ndarray
    mpp: float
    pen_fraction: float = 0.0

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp * 1e-3) ** 2

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel OD = -ln((I + 1) / 256) of uint8 RGB; float32 (H, W, 3)."""
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Blue, green and black marker ink, bool (H, W), by colour alone.

    H&E and IHC tissue is pink, purple, blue-grey or brown: red is never far below blue,
    green never clearly above red, and at thumbnail scale (nuclei averaged with stroma)
    it never absorbs like ink. Ink over tissue keeps its cue: blue/green ink absorbs red.
    """
    r, g, b = (rgb[..., k].astype(np.int16) for k in range(3))
    blue = (b - r > 45) & (b - g > 15) & (r < 160)
    green = (g - r > 15) & (r < 200)
    cmax = np.maximum(np.maximum(r, g), b)
    saturation = (cmax - np.minimum(np.minimum(r, g), b)) / np.maximum(cmax, 1)
    # Black ink is neutral; dense haematoxylin (epidermis, lymphoid aggregates) is purple.
    black = (cmax < 70) | ((cmax < 120) & (saturation < 0.45))
    return blue | green | black


def _component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # lazy: decode worker processes import this module (via tiles), need no SciPy
    from scipy import ndimage as ndi

    labels, n = ndi.label(mask)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _drop_small_components(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Remove 4-connected components smaller than `min_px` pixels."""
    labels, sizes = _component_sizes(mask)
    keep = sizes >= max(1, min_px)
    keep[0] = False
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill enclosed background components of at most `max_px` pixels."""
    # lazy: decode worker processes import this module (via tiles), need no SciPy
    from scipy import ndimage as ndi

    holes = ndi.binary_fill_holes(mask) & ~mask
    labels, sizes = _component_sizes(holes)
    fill = sizes <= max_px
    fill[0] = False
    return mask | fill[labels]


def tissue_mask_from_thumbnail(rgb: np.ndarray, mpp: float) -> TissueMask:
    """Tissue mask of a uint8 RGB thumbnail (H, W, 3) at `mpp` µm/px."""
    # lazy: decode worker processes import this module (via tiles), need neither
    from scipy import ndimage as ndi
    from skimage import morphology

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    od_sum = optical_density(rgb).sum(axis=2)
    rgb_f = rgb.astype(np.float32)
    cmax = rgb_f.max(axis=2)
    saturation = (cmax - rgb_f.min(axis=2)) / np.maximum(cmax, 1.0)
    px_area_um2 = mpp * mpp

    glass_od = float(np.percentile(od_sum, GLASS_OD_PERCENTILE)) if od_sum.size else 0.0
    if glass_od > GLASS_OD_MAX:
        glass_od = GLASS_OD_DEFAULT
    od_t = glass_od + TISSUE_OD_MARGIN
    tissue = (od_sum > od_t) & (
        (saturation > MIN_TISSUE_SATURATION) | (od_sum > glass_od + DENSE_OD_MARGIN)
    )

    ink = pen_mask(rgb)
    ink = ndi.binary_opening(ink, structure=morphology.disk(1))
    ink = _drop_small_components(ink, min_px=int(MIN_PEN_AREA_UM2 / px_area_um2))
    if ink.any():
        radius_px = max(1, int(round(PEN_DILATION_UM / mpp)))
        ink = ndi.binary_dilation(ink, structure=morphology.disk(radius_px))
    tissue &= ~ink
    close_px = max(1, int(round(CLOSING_UM / mpp)))
    tissue = ndi.binary_closing(np.pad(tissue, close_px), structure=morphology.disk(close_px))
    tissue = tissue[close_px:-close_px, close_px:-close_px]
    tissue = _fill_small_holes(tissue, max_px=int(MAX_HOLE_AREA_UM2 / px_area_um2))
    tissue &= ~ink  # closing and filled holes must not bring ink back
    min_px = min(MIN_TISSUE_AREA_UM2 / px_area_um2, MIN_TISSUE_IMAGE_FRACTION * tissue.size)
    tissue = _drop_small_components(tissue, min_px=int(min_px))
    non_glass = od_sum > od_t
    pen_fraction = float(ink.sum() / max(1, non_glass.sum() + ink.sum()))
    return TissueMask(mask=tissue, mpp=float(mpp), pen_fraction=min(1.0, pen_fraction))


def tissue_mask(slide, mpp: float = COARSE_MPP) -> TissueMask:
    """Tissue mask of a :class:`~tilscore.slide.Slide` from its thumbnail at `mpp` µm/px.

    The mask's pixel grid starts at level-0 (0, 0); its size is the slide size / (mpp /
    slide.mpp), rounded, and its ``mpp`` the thumbnail's real µm per pixel
    (:meth:`~tilscore.slide.Slide.thumbnail_mpp`).
    """
    thumb = slide.thumbnail(mpp)
    return tissue_mask_from_thumbnail(thumb, slide.thumbnail_mpp(mpp))
