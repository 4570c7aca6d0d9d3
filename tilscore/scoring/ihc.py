"""IHC colour: H-DAB colour deconvolution and per-slide stain-vector estimation (pure).

Beer–Lambert: a pixel's optical density ``OD = -ln(I / 255)`` (per RGB channel, background
intensity 255) is a sum of stain concentrations times unit OD vectors, ``OD = c @ M`` with
``M`` a 3 x 3 matrix whose rows are haematoxylin, DAB and a residual (the cross product of
the two, so the matrix is invertible). Concentrations are ``OD @ pinv(M)``, in OD units
along each stain vector.

The defaults are Ruifrok & Johnston (2001), the values of scikit-image's ``hdx_from_rgb``
and QuPath's "H-DAB default". :func:`estimate_stain_vectors` adapts them to a slide
(Macenko et al. 2009) from its low-resolution thumbnail and falls back to the defaults,
with a reason, whenever the estimate is implausible; it also measures the slide's glass
colour (the OD reference). Cell detection is in :mod:`tilscore.ihc_detect`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# Ruifrok & Johnston (2001) H-DAB optical-density vectors (unit length up to rounding).
HAEMATOXYLIN_OD = (0.650, 0.704, 0.286)
DAB_OD = (0.268, 0.570, 0.776)
# Eosin (Ruifrok & Johnston's H&E 2 eosin): the direction an H&E slide's second stain has.
EOSIN_OD = (0.072, 0.990, 0.105)
MAX_OD = math.log(255.0)  # an intensity of 0 is clamped to 1: OD at most ln 255 = 5.54


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def stain_matrix(haematoxylin=HAEMATOXYLIN_OD, dab=DAB_OD) -> np.ndarray:
    """float64 (3, 3) rows: unit haematoxylin, unit DAB, residual = unit(H x DAB)."""
    h, d = _unit(haematoxylin), _unit(dab)
    return np.stack([h, d, _unit(np.cross(h, d))])


DEFAULT_STAIN_MATRIX = stain_matrix()


def angle_deg(a, b) -> float:
    """Angle in degrees between two 3-vectors (direction only)."""
    cos = float(np.clip(np.dot(_unit(a), _unit(b)), -1.0, 1.0))
    return math.degrees(math.acos(cos))


def optical_density(rgb_uint8: torch.Tensor, background_rgb=None) -> torch.Tensor:
    """Optical density of an RGB batch, on the input's device.

    rgb_uint8: uint8 (N, H, W, 3) (or float in [0, 255], e.g. after resampling).
    background_rgb: the glass intensity I0 per channel (3 numbers; None = 255).
    Returns float32 (N, 3, H, W) ``-ln(clamp(I, 1, I0) / I0)``: 0 on glass, at most ln 255.
    """
    x = rgb_uint8.float().permute(0, 3, 1, 2)
    if background_rgb is None:
        return -torch.log(x.clamp(1.0, 255.0) / 255.0)
    i0 = torch.as_tensor(background_rgb, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return -torch.log(torch.minimum(x.clamp_min(1.0), i0) / i0)


def _inverse(matrix, device) -> torch.Tensor:
    """float32 (3, 3) pseudo-inverse of a stain matrix (array, tensor, StainVectors, None)."""
    if matrix is None:
        matrix = DEFAULT_STAIN_MATRIX
    if isinstance(matrix, StainVectors):
        matrix = matrix.matrix
    if torch.is_tensor(matrix):
        matrix = matrix.detach().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"stain matrix must be 3 x 3 (rows H, DAB, residual), got {m.shape}")
    return torch.from_numpy(np.linalg.pinv(m)).to(device=device, dtype=torch.float32)


def od_to_concentrations(od: torch.Tensor, stain_matrix=None) -> torch.Tensor:
    """float32 (N, 3, H, W) OD -> (N, 3, H, W) concentrations (H, DAB, residual) in OD
    units, via ``OD @ pinv(M)``. ``stain_matrix``: (3, 3) array/tensor, StainVectors or
    None (Ruifrok defaults)."""
    inv = _inverse(stain_matrix, od.device)  # (3 channels, 3 stains)
    return torch.einsum("nchw,cs->nshw", od, inv)


def deconvolve(rgb_uint8_nhwc: torch.Tensor, stain_matrix=None) -> torch.Tensor:
    """Stain concentrations of an RGB batch, on its device.

    rgb_uint8_nhwc: uint8 (N, H, W, 3). stain_matrix: (3, 3) rows H, DAB, residual (array
    or tensor; OD relative to 255), a :class:`StainVectors` (its matrix and its glass
    intensity ``background_rgb``), or None (Ruifrok defaults, glass 255).
    Returns float32 (N, 3, H, W): haematoxylin, DAB, residual concentrations (OD units;
    a pure-stain pixel of OD vector ``c * v`` gives ``c``).
    """
    background = stain_matrix.background_rgb if isinstance(stain_matrix, StainVectors) else None
    return od_to_concentrations(optical_density(rgb_uint8_nhwc, background), stain_matrix)


@dataclass(frozen=True)
class StainVectors:
    """A slide's H-DAB stain matrix and where it came from.

    ``matrix``: float64 (3, 3) unit rows haematoxylin, DAB, residual. ``source``:
    "estimated" or "default". ``angle_deg``: {"haematoxylin", "dab"} degrees between the
    estimated vectors and the Ruifrok defaults (empty when nothing was estimated).
    ``reason``: why the defaults were used ("" when estimated), in words; ``fallback``: the
    same as a code (:data:`FALLBACKS`; "" when estimated). ``background_rgb``: the
    glass intensity per channel (OD zero), measured on the slide: scanners' white balance
    often leaves glass at e.g. (225, 222, 214), a tint that a 255 reference would read
    as ~0.2 OD of DAB everywhere.
    """

    matrix: np.ndarray
    source: str
    angle_deg: dict = field(default_factory=dict)
    reason: str = ""
    background_rgb: tuple[float, float, float] = (255.0, 255.0, 255.0)
    fallback: str = ""


# Why estimate_stain_vectors kept the defaults. The first two are normal for a sparse
# marker (little DAB on the thumbnail) or a small field; the others question the stain.
FALLBACKS = ("too_few_pixels", "little_dab", "eosin", "collinear", "deviation")
BENIGN_FALLBACKS = ("too_few_pixels", "little_dab")


@dataclass(frozen=True)
class EstimationLimits:
    """Sanity limits of :func:`estimate_stain_vectors` (angles in degrees, OD units).

    ``min_od``: a pixel takes part when its OD norm exceeds this (0.15 as Macenko).
    ``min_pixels``: fewer tissue pixels above ``min_od`` → defaults.
    ``percentile``: robust extremes of the in-plane angle (1 and 99 as Macenko).
    ``min_separation_deg``: H and DAB estimates closer than this are collinear → defaults.
    ``max_deviation_deg``: a vector further than this from its default → defaults.
    ``min_dab_fraction``: share of OD pixels that must be DAB-dominated (DAB concentration
    above ``dab_present_od`` and above the haematoxylin one) for an estimate. The DAB end
    is read at the 99th angle percentile: with fewer DAB-dominated pixels than a few %,
    it lands on H-DAB mixtures (a sparse marker such as FOXP3 at 8 µm/px gives ~2 % and an
    estimate ~14° towards haematoxylin), so such slides keep the default DAB vector.
    ``min_glass``, ``max_glass_spread``: a glass estimate darker than this in any channel,
    or with channels further apart than this (tinted, i.e. tissue), is replaced by 255.
    """

    min_od: float = 0.15
    min_pixels: int = 500
    percentile: float = 1.0
    min_separation_deg: float = 10.0
    max_deviation_deg: float = 25.0
    min_dab_fraction: float = 0.05
    dab_present_od: float = 0.15
    min_glass: float = 180.0
    max_glass_spread: float = 30.0


def _default(code: str, reason: str, angles: dict | None = None,
             glass=(255.0, 255.0, 255.0)) -> StainVectors:
    return StainVectors(DEFAULT_STAIN_MATRIX.copy(), "default", angles or {}, reason, glass,
                        code)


def estimate_background_rgb(rgb_uint8: np.ndarray, tissue: np.ndarray | None = None,
                            *, limits: EstimationLimits = EstimationLimits()) -> tuple:
    """Glass intensity (I0) per channel of an RGB image, as three floats.

    rgb_uint8: uint8 (H, W, 3); tissue: bool (H, W) or None. The median colour of the
    brighter half of the non-tissue pixels (with a mask: pen ink and dust are non-tissue
    too), or of the brightest 2 % (without one). (255, 255, 255) when there is none or it
    is not plausibly glass: darker than ``limits.min_glass`` or tinted (channels further
    apart than ``limits.max_glass_spread``).
    """
    pix = np.asarray(rgb_uint8).reshape(-1, 3)
    if tissue is not None:
        pix = pix[~np.asarray(tissue, dtype=bool).reshape(-1)]
    white = (255.0, 255.0, 255.0)
    if len(pix) < 20:
        return white
    level = pix.astype(np.int32).sum(axis=1)
    bright = pix[level >= np.percentile(level, 50.0 if tissue is not None else 98.0)]
    glass = np.median(bright, axis=0)
    if glass.min() < limits.min_glass or np.ptp(glass) > limits.max_glass_spread:
        return white
    return tuple(float(v) for v in glass)


def estimate_stain_vectors(rgb_uint8: np.ndarray, tissue: np.ndarray | None = None,
                           *, limits: EstimationLimits = EstimationLimits()) -> StainVectors:
    """Macenko estimate of a slide's haematoxylin and DAB OD vectors from a thumbnail.

    rgb_uint8: uint8 (H, W, 3) low-resolution image of the slide (~8 µm/px). tissue: bool
    (H, W) or None (all pixels; glass drops out by the OD threshold anyway).

    Tissue pixels with OD norm > ``limits.min_od`` are projected on the plane of the two
    leading eigenvectors of their OD (uncentred second moments); the 1st and 99th
    percentiles of the in-plane angle give the two extreme stain directions, named H or
    DAB by which assignment is closer to the Ruifrok defaults. Falls back to the defaults
    (``source="default"`` with a ``reason``) when there are too few pixels, DAB is
    essentially absent (e.g. a haematoxylin-only field, or an H&E slide whose second
    stain is eosin), the two estimates are nearly collinear, or either strays more than
    ``limits.max_deviation_deg`` from its default.
    """
    rgb = np.asarray(rgb_uint8)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    glass = estimate_background_rgb(rgb, tissue, limits=limits)
    pix = rgb.reshape(-1, 3)
    if tissue is not None:
        pix = pix[np.asarray(tissue, dtype=bool).reshape(-1)]
    i0 = np.asarray(glass)
    od = -np.log(np.minimum(np.maximum(pix.astype(np.float64), 1.0), i0) / i0)
    od = od[np.linalg.norm(od, axis=1) > limits.min_od]
    if len(od) < limits.min_pixels:
        return _default("too_few_pixels", "too few stained tissue pixels "
                        f"({len(od)} < {limits.min_pixels})", glass=glass)
    # DAB present? Judge with the default vectors first: with no DAB, the second
    # principal direction is noise (or eosin) and any estimate is meaningless.
    conc = od @ np.linalg.pinv(DEFAULT_STAIN_MATRIX)
    dab_dominant = (conc[:, 1] > limits.dab_present_od) & (conc[:, 1] > conc[:, 0])
    dab_fraction = float(dab_dominant.mean())
    _, vecs = np.linalg.eigh(od.T @ od / len(od))
    plane = vecs[:, [2, 1]]  # leading eigenvector first
    plane[:, 0] *= np.sign(plane[:, 0].sum())  # stain ODs are positive in every channel
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [limits.percentile, 100.0 - limits.percentile])
    ends = [_unit(plane @ np.array([math.cos(a), math.sin(a)])) for a in (lo, hi)]
    ends = [e if e.sum() > 0 else -e for e in ends]
    h_def, d_def, e_def = _unit(HAEMATOXYLIN_OD), _unit(DAB_OD), _unit(EOSIN_OD)
    keep = angle_deg(ends[0], h_def) + angle_deg(ends[1], d_def)
    swap = angle_deg(ends[1], h_def) + angle_deg(ends[0], d_def)
    h_est, d_est = (ends[0], ends[1]) if keep <= swap else (ends[1], ends[0])
    angles = {"haematoxylin": angle_deg(h_est, h_def), "dab": angle_deg(d_est, d_def)}
    if angle_deg(d_est, e_def) < angle_deg(d_est, d_def):
        return _default("eosin", "second stain looks like eosin, not DAB (an H&E slide?): "
                        f"{angle_deg(d_est, e_def):.0f}° from eosin, "
                        f"{angles['dab']:.0f}° from DAB", angles, glass)
    if dab_fraction < limits.min_dab_fraction:
        return _default("little_dab", "too little DAB to estimate it "
                        f"({100 * dab_fraction:.2f}% of stained pixels DAB-dominated < "
                        f"{100 * limits.min_dab_fraction:.0f}%)", angles, glass)
    separation = angle_deg(h_est, d_est)
    if separation < limits.min_separation_deg:
        return _default("collinear", "estimated H and DAB vectors nearly collinear "
                        f"({separation:.1f}° apart < {limits.min_separation_deg}°)", angles,
                        glass)
    for name, value in angles.items():
        if value > limits.max_deviation_deg:
            return _default("deviation", f"estimated {name} vector {value:.1f}° from its "
                            f"default (> {limits.max_deviation_deg}°)", angles, glass)
    return StainVectors(stain_matrix(h_est, d_est), "estimated", angles, "", glass)
