"""Tissue detection on a low-resolution thumbnail.

Brightfield background is bright and unsaturated; stained tissue (H&E or IHC
counterstain, even pale) absorbs light, i.e. has optical density (OD) above the glass.
We threshold OD and saturation with Otsu (clamped to sane ranges so an all-tissue or
all-glass thumbnail does not produce nonsense), remove pen ink by colour, then clean
up with morphology: small specks and dust out, holes (bubbles, vessel lumina) filled
up to a size. Everything runs on a thumbnail at ~8 µm/px (a 25 x 20 mm slide is
3125 x 2500 px), so cost is negligible next to reading the slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TISSUE_MASK_MPP = 8.0  # µm/px of the thumbnail the mask is computed on
# OD (sum over RGB, natural log) of glass is ~0.0–0.1; pale eosin ~0.25; we never accept
# a background threshold below/above these bounds whatever Otsu says.
OD_THRESHOLD_RANGE = (0.12, 0.45)
SATURATION_THRESHOLD_RANGE = (0.05, 0.20)
MIN_TISSUE_AREA_UM2 = 0.02e6  # 0.02 mm²: smaller components are dust/debris
MAX_HOLE_AREA_UM2 = 0.05e6  # 0.05 mm²: larger holes are real gaps, not bubbles/lumina
PEN_DILATION_UM = 40.0  # ink edges blend with tissue: grow the pen mask a little


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
    """Blue, green and black marker ink, bool (H, W).

    H&E and IHC tissue is pink, purple or brown: red is never far below blue and green
    rarely dominates. Ink is strongly blue (B ≫ R), green (G > R and G ≥ B) or nearly
    black (all channels dark) in a thumbnail where nuclei are averaged with stroma.
    """
    r, g, b = (rgb[..., k].astype(np.int16) for k in range(3))
    blue = (b - r > 45) & (b - g > 15) & (r < 160)
    green = (g - r > 20) & (g - b > -10) & (r < 180)
    black = (np.maximum(np.maximum(r, g), b) < 70)
    return blue | green | black


def _otsu_clamped(values: np.ndarray, lo: float, hi: float) -> float:
    from skimage.filters import threshold_otsu

    if values.size < 2 or float(values.max()) == float(values.min()):
        return lo
    return float(np.clip(threshold_otsu(values), lo, hi))


def _component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    from scipy import ndimage as ndi

    holes = ndi.binary_fill_holes(mask) & ~mask
    labels, sizes = _component_sizes(holes)
    fill = sizes <= max_px
    fill[0] = False
    return mask | fill[labels]


def tissue_mask_from_thumbnail(rgb: np.ndarray, mpp: float) -> TissueMask:
    """Tissue mask of a uint8 RGB thumbnail (H, W, 3) at `mpp` µm/px."""
    from scipy import ndimage as ndi
    from skimage import morphology

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB (H, W, 3), got {rgb.dtype} {rgb.shape}")
    od_sum = optical_density(rgb).sum(axis=2)
    rgb_f = rgb.astype(np.float32)
    cmax = rgb_f.max(axis=2)
    saturation = (cmax - rgb_f.min(axis=2)) / np.maximum(cmax, 1.0)

    ink = pen_mask(rgb)
    candidates = ~ink
    od_t = _otsu_clamped(od_sum[candidates], *OD_THRESHOLD_RANGE)
    sat_t = _otsu_clamped(saturation[candidates], *SATURATION_THRESHOLD_RANGE)
    # Tissue must absorb (OD) and either be coloured or clearly dense; glass + dust is
    # neither. Pale tissue passes on OD alone once clearly above the glass threshold.
    tissue = (od_sum > od_t) & ((saturation > sat_t) | (od_sum > 2 * od_t))

    px_area_um2 = mpp * mpp
    if ink.any():
        radius_px = max(1, int(round(PEN_DILATION_UM / mpp)))
        ink = ndi.binary_dilation(ink, structure=morphology.disk(radius_px))
    tissue &= ~ink
    tissue = ndi.binary_opening(tissue, structure=morphology.disk(1))
    tissue = _fill_small_holes(tissue, max_px=int(MAX_HOLE_AREA_UM2 / px_area_um2))
    tissue &= ~ink  # a filled hole must not bring ink back
    tissue = _drop_small_components(tissue, min_px=int(MIN_TISSUE_AREA_UM2 / px_area_um2))
    non_glass = od_sum > od_t
    pen_fraction = float(ink.sum() / max(1, non_glass.sum() + ink.sum()))
    return TissueMask(mask=tissue, mpp=float(mpp), pen_fraction=min(1.0, pen_fraction))


def tissue_mask(slide, mpp: float = TISSUE_MASK_MPP) -> TissueMask:
    """Tissue mask of a :class:`~tilscore.slide.Slide` from its thumbnail at `mpp` µm/px.

    The mask's pixel grid starts at level-0 (0, 0); its size is the slide size / (mpp /
    slide.mpp), rounded.
    """
    thumb = slide.thumbnail(mpp)
    return tissue_mask_from_thumbnail(thumb, mpp)
