"""Synthetic-slide textures, interpolation and Beer–Lambert painting.

Split out of :mod:`tilscore.synth_scene` (which decides *what* is where); this module
decides how it looks: noise textures, bilinear sampling of coarse fields, and stain
concentrations → RGB for regions, nuclei, membranes and ink.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

# Cell kinds (codes shared with synth_scene, which places them).
KIND_LYMPH, KIND_TUMOUR, KIND_FIBRO, KIND_OTHER = 0, 1, 2, 3
_MAX_RADIUS_UM = 6.5  # largest bounding radius of any nucleus

# -- textures and interpolation ---------------------------------------------------------
@dataclass(frozen=True)
class Texture:
    """A periodic texture: ``data`` float32 (N, N), sample k at k * ``res_um`` µm."""

    data: np.ndarray
    res_um: float


def _axis(pos: np.ndarray, n: int, wrap: bool, dtype) -> tuple:
    """Linear-interpolation neighbours (i0, i1) and weight t of fractional grid positions;
    outside the grid positions clamp to the edge (wrap=False) or wrap around."""
    pos = np.asarray(pos, np.float64)
    i0 = np.floor(pos).astype(np.int64)
    if wrap:
        t = pos - i0
        i0 %= n
        return i0, (i0 + 1) % n, t.astype(dtype)
    i0 = np.clip(i0, 0, n - 2)
    return i0, i0 + 1, np.clip(pos - i0, 0.0, 1.0).astype(dtype)


def sample_grid(field: np.ndarray, *, ypos: np.ndarray, xpos: np.ndarray,
                wrap: bool = False) -> np.ndarray:
    """Bilinear samples of `field` on the grid ypos x xpos (fractional indices):
    (len(ypos), len(xpos)) in the field's dtype. Separable (x first, then y) with the same
    arithmetic as :func:`sample_points`, so grid and point values agree bit for bit; no
    BLAS (multithreaded BLAS on tiny matrices is slow)."""
    y0, y1, ty = _axis(ypos, field.shape[0], wrap, field.dtype)
    x0, x1, tx = _axis(xpos, field.shape[1], wrap, field.dtype)
    rows, inv = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    sub = field[rows]
    g = sub[:, x0] * (1 - tx) + sub[:, x1] * tx
    m = y0.size
    return g[inv[:m]] * (1 - ty)[:, None] + g[inv[m:]] * ty[:, None]


def sample_points(field: np.ndarray, *, ypos: np.ndarray, xpos: np.ndarray,
                  wrap: bool = False) -> np.ndarray:
    """Bilinear samples of `field` at points (fractional indices, same shape)."""
    y0, y1, ty = _axis(ypos, field.shape[0], wrap, field.dtype)
    x0, x1, tx = _axis(xpos, field.shape[1], wrap, field.dtype)
    top = field[y0, x0] * (1 - tx) + field[y0, x1] * tx
    bottom = field[y1, x0] * (1 - tx) + field[y1, x1] * tx
    return top * (1 - ty) + bottom * ty


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int],
                 *, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit s.d., float64 `shape`.

    Large sigmas are filtered on a reduced grid and upsampled (cost independent of
    sigma)."""
    factor = max(1.0, sigma_px / 4.0)
    small = (max(2, int(math.ceil(shape[0] / factor)) + 2),
             max(2, int(math.ceil(shape[1] / factor)) + 2))
    field = gaussian_filter(rng.standard_normal(small), sigma_px / factor, mode="wrap")
    if factor > 1.0:
        field = cv2.resize(field, (int(small[1] * factor), int(small[0] * factor)),
                           interpolation=cv2.INTER_CUBIC)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / max(field.std(), 1e-12)


def _fft_noise(rng: np.random.Generator, n: int, res_um: float, along_um: float,
               across_um: float, angle: float = 0.0) -> np.ndarray:
    """Periodic (n, n) float32 noise, Gaussian-correlated: s.d. `along_um` in direction
    `angle` (radians from +x towards +y), `across_um` across it; zero mean, unit s.d."""
    f = np.fft.fftfreq(n, d=res_um)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    u = fx * math.cos(angle) + fy * math.sin(angle)
    v = -fx * math.sin(angle) + fy * math.cos(angle)
    gain = np.exp(-2 * math.pi**2 * ((along_um * u) ** 2 + (across_um * v) ** 2))
    out = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * gain).real
    return ((out - out.mean()) / out.std()).astype(np.float32)


def _fat_walls(rng: np.random.Generator, n: int = 512, res_um: float = 2.0) -> np.ndarray:
    """Periodic half-gap (F2 - F1) / 2 in µm of a jittered Voronoi tiling (~73 µm cells):
    ~0 on the walls between adipocytes."""
    cells = 14
    period = n * res_um
    grid = (np.stack(np.meshgrid(np.arange(cells), np.arange(cells)), -1).reshape(-1, 2)
            + 0.5 + rng.uniform(-0.35, 0.35, (cells * cells, 2))) * (period / cells)
    tiled = np.concatenate([grid + period * np.array([dx, dy])
                            for dx in (-1, 0, 1) for dy in (-1, 0, 1)])
    yy, xx = np.meshgrid((np.arange(n) + 0.5) * res_um, (np.arange(n) + 0.5) * res_um,
                         indexing="ij")
    dist, _ = cKDTree(tiled).query(np.stack([xx.ravel(), yy.ravel()], 1), k=2)
    return ((dist[:, 1] - dist[:, 0]) / 2).reshape(n, n).astype(np.float32)


@functools.lru_cache(maxsize=1)
def textures() -> dict[str, Texture]:
    """Process-wide periodic textures (fixed seed; scenes differ by random offsets)."""
    rng = np.random.default_rng(20240607)
    tex = {
        "rough": Texture(_fft_noise(rng, 512, 2.0, 5.0, 5.0), 2.0),  # boundary roughness
        "fine": Texture(_fft_noise(rng, 1024, 0.5, 0.5, 0.5), 0.5),  # grain, chromatin
        "mid": Texture(_fft_noise(rng, 1024, 0.5, 3.0, 3.0), 0.5),  # cytoplasm mottling
        "speck": Texture(_fft_noise(rng, 1024, 0.5, 0.8, 0.8), 0.5),  # necrotic debris
        "fat": Texture(_fat_walls(rng), 2.0),
    }
    for k in range(4):  # wavy collagen fibres at 0, 45, 90, 135 degrees
        fibre = _fft_noise(rng, 1024, 0.5, 12.0, 0.7, k * math.pi / 4)
        tex[f"fibre{k}"] = Texture(_warp(rng, fibre, 6.0, 16.0), 0.5)
    return tex


def _warp(rng: np.random.Generator, data: np.ndarray, amp_px: float,
          sigma_px: float) -> np.ndarray:
    """Periodic texture displaced by a smooth periodic random field (amplitude `amp_px`)."""
    n = data.shape[0]
    dy, dx = (amp_px * _fft_noise(rng, n, 1.0, sigma_px, sigma_px) for _ in range(2))
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    return cv2.remap(data, xx + dx, yy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


# -- painting (stain concentrations; channels: 0 haematoxylin, 1 eosin or DAB, 2 neutral) --
MARGIN_UM = _MAX_RADIUS_UM + 2.0  # nuclei (and CD20 rings) reach this far from the centre
_CD20_RING_UM = 1.25
# Optical density per unit concentration, rows = stains (Ruifrok & Johnston 2001).
_OD = {"haematoxylin": (0.65, 0.70, 0.29), "eosin": (0.07, 0.99, 0.11),
       "dab": (0.27, 0.57, 0.78), "neutral": (1.0, 1.0, 1.0)}
_INK_OD = np.array([[1.1, 0.6, 0.15], [0.9, 0.25, 0.8], [1.6, 1.6, 1.5]])  # blue/green/black


def stain_od_matrix(stain: str) -> np.ndarray:
    """(3, 3) float32 unit optical-density vectors: haematoxylin, eosin|DAB, neutral."""
    rows = ["haematoxylin", "eosin" if stain == "he" else "dab", "neutral"]
    od = np.array([_OD[r] for r in rows], np.float64)
    return (od / np.linalg.norm(od, axis=1, keepdims=True)).astype(np.float32)


def _tex_grid(tex: dict, name: str, slot: int, offsets, ys_um, xs_um) -> np.ndarray:
    t = tex[name]
    return sample_grid(t.data, ypos=ys_um / t.res_um + offsets[slot, 0],
                       xpos=xs_um / t.res_um + offsets[slot, 1], wrap=True)


def paint_regions(stain, labels, *, necrosis, fibre, ys_um, xs_um, tex, offsets) -> np.ndarray:
    """Background stain concentrations by region: float32 (3, h, w).

    labels: uint8 (h, w) codes; necrosis: bool (h, w) ("other" looks necrotic, else fat;
    None when there is no "other"); fibre: (cos 2θ, sin 2θ) fields (h, w) of the collagen
    direction (None when there is no stroma)."""
    he = stain == "he"
    h, w = labels.shape
    conc = np.zeros((3, h, w), np.float32)
    fine = _tex_grid(tex, "fine", 3, offsets, ys_um, xs_um)
    conc[2] = 0.035 + 0.008 * fine  # glass: 245-250 with grain
    if fibre is not None:  # stroma: collagen fibres along the local direction
        c, s = fibre
        norm = np.hypot(c, s) + 1e-9
        c, s = c / norm, s / norm
        weights = [np.maximum(c, 0) ** 2, np.maximum(s, 0) ** 2,
                   np.maximum(-c, 0) ** 2, np.maximum(-s, 0) ** 2]
        fib = sum(wk * _tex_grid(tex, f"fibre{k}", 4, offsets, ys_um, xs_um)
                  for k, wk in enumerate(weights) if wk.max() > 0)
        fib = fib / np.sqrt(sum(wk**2 for wk in weights))
        m = labels == 2
        if he:
            mid = _tex_grid(tex, "mid", 1, offsets, ys_um, xs_um)
            conc[1][m] = (0.5 * np.clip(1 + 0.3 * fib + 0.15 * mid, 0.1, 2.5))[m]
            conc[0][m] = (0.06 + 0.015 * fine)[m]
        else:
            conc[0][m] = (0.09 * np.clip(1 + 0.5 * fib, 0.2, 2))[m]
            conc[2][m] = (0.07 * np.clip(1 + 0.5 * fib, 0.2, 2))[m]
    tumour, other = labels == 1, labels == 3
    if not (tumour.any() or other.any()):
        return conc
    mid = _tex_grid(tex, "mid", 5, offsets, ys_um, xs_um)
    if tumour.any():  # pale pink-purple cytoplasm
        conc[0][tumour] = ((0.14 if he else 0.10) * (1 + 0.12 * mid))[tumour]
        conc[1][tumour] = (0.30 * (1 + 0.12 * mid))[tumour] if he else 0.0
        conc[2][tumour] = 0.04
    nec = other & necrosis if necrosis is not None else other
    if nec.any():  # pale amorphous pink with dark karyorrhectic debris
        debris = 4.0 * np.clip(_tex_grid(tex, "speck", 6, offsets, ys_um, xs_um) - 2.0, 0, 0.5)
        conc[0][nec] = ((0.10 if he else 0.07) + (1.0 if he else 0.6) * debris)[nec]
        conc[1][nec] = ((0.42 if he else 0.05) * (1 + 0.35 * mid))[nec]
        conc[2][nec] = 0.06
    fat = other & ~nec
    if fat.any():  # empty adipocytes with thin walls
        half_gap = _tex_grid(tex, "fat", 7, offsets, ys_um, xs_um)
        wall = np.exp(-((half_gap / (1.0 if he else 1.4)) ** 2))
        conc[1][fat] = ((0.5 if he else 0.0) * wall)[fat]
        conc[0][fat] = ((0.04 if he else 0.3) * wall)[fat]
        conc[2][fat] = (0.035 + (0.04 if he else 0.1) * wall)[fat]
    return conc


def _nucleus_values(kind, stain, rho, alpha, ring, chrom, nucleolus, tone, positive):
    """(haematoxylin, eosin|DAB) concentrations of one kind's nuclei, arrays (n, B, B)."""
    he = stain == "he"
    counter = 1.0 if he else 0.5  # IHC counterstain is lighter
    if kind == KIND_LYMPH:
        hx = 2.1 * counter * tone * (1 + 0.12 * chrom) * alpha
        other = np.zeros_like(hx) if he else None
        if not he:
            if stain == "foxp3":  # brown nucleus, little haematoxylin
                hx = np.where(positive, 0.25 * alpha, hx)
                other = 1.5 * tone * (1 + 0.15 * chrom) * alpha * positive
            else:  # cd20: brown membrane ring around a blue nucleus
                other = 1.2 * tone * (1 + 0.3 * chrom) * ring * positive
        return hx, other
    if kind == KIND_TUMOUR:  # vesicular: pale centre, dark rim, chromatin, nucleolus
        base = 0.75 * counter * tone * (0.5 + 0.6 * np.minimum(rho, 1.0) ** 4)
        hx = base * (1 + 0.35 * chrom) * alpha + (0.9 * counter) * nucleolus
        return hx, (0.25 * nucleolus if he else np.zeros_like(hx))
    strength = 1.5 if kind == KIND_FIBRO else 1.9
    hx = strength * counter * tone * (1 + 0.15 * chrom) * alpha
    return hx, np.zeros_like(hx)


def paint_nuclei(conc, cells, *, stain, x0_um, y0_um, s_um, tex) -> None:
    """Add nuclei (and CD20 membranes) to `conc` (3, h, w) in place.

    x0_um, y0_um: µm position of pixel (0, 0)'s centre; s_um: µm per pixel. Each cell is
    drawn in its own bounding box (vectorised per kind); anti-aliased edges."""
    _, h, w = conc.shape
    fine = tex["fine"]
    nfine = fine.data.shape[0]
    alpha_sum = np.zeros(h * w, np.float32)
    for kind in (KIND_LYMPH, KIND_TUMOUR, KIND_FIBRO, KIND_OTHER):
        sel = cells["kind"] == kind
        if not np.any(sel):
            continue
        c = {k: v[sel] for k, v in cells.items()}
        ring_um = _CD20_RING_UM if (kind == KIND_LYMPH and stain == "cd20") else 0.0
        rb = int(math.ceil((c["a_um"].max() + ring_um) / s_um)) + 1
        off = np.arange(-rb, rb + 1)
        cx, cy = (c["x_um"] - x0_um) / s_um, (c["y_um"] - y0_um) / s_um
        jj = np.rint(cx).astype(np.int64)[:, None, None] + off[None, None, :]
        ii = np.rint(cy).astype(np.int64)[:, None, None] + off[None, :, None]
        dx = (jj - cx[:, None, None]) * s_um
        dy = (ii - cy[:, None, None]) * s_um
        ca, sa = np.cos(c["angle"])[:, None, None], np.sin(c["angle"])[:, None, None]
        a, b = c["a_um"][:, None, None], c["b_um"][:, None, None]
        rho = np.hypot((dx * ca + dy * sa) / a, (dy * ca - dx * sa) / b)
        sd = np.hypot(dx, dy) * (1 - 1 / np.maximum(rho, 1e-6))  # µm outside the edge
        alpha = np.clip(0.5 - sd / s_um, 0, 1)
        ring = np.clip(0.5 - (sd - ring_um) / s_um, 0, 1) - alpha if ring_um else 0.0
        nucleolus = 0.0
        if kind == KIND_TUMOUR:
            r = 0.3 * a
            phi = c["nucleolus"][:, None, None]
            dn = np.hypot(dx - r * np.cos(phi), dy - r * np.sin(phi))
            nucleolus = np.clip(0.5 - (dn - 0.8) / s_um, 0, 1)
        ty = (np.rint((ii * s_um + y0_um) / fine.res_um).astype(np.int64)
              + c["tex"][:, 0, None, None]) % nfine
        tx = (np.rint((jj * s_um + x0_um) / fine.res_um).astype(np.int64)
              + c["tex"][:, 1, None, None]) % nfine
        chrom = np.clip(fine.data[ty, tx], -2.0, 2.0)  # chromatin grain, bounded
        tone = c["tone"][:, None, None]
        positive = c["positive"][:, None, None]
        hx, other = _nucleus_values(kind, stain, rho, alpha, ring, chrom, nucleolus, tone,
                                    positive)
        inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
        inside = inside & ((alpha > 0) | (np.asarray(ring) > 0))
        flat = (ii * w + jj)[inside]
        conc[0] += np.bincount(flat, hx[inside], h * w).reshape(h, w)
        if np.any(other):
            conc[1] += np.bincount(flat, other[inside], h * w).reshape(h, w)
        alpha_sum += np.bincount(flat, alpha[inside], h * w)
    if stain == "he":  # nuclei displace the eosinophilic background
        conc[1] *= 1 - 0.6 * np.clip(alpha_sum, 0, 1).reshape(h, w)


def paint_pen(od, pen, *, colours, ys_um, xs_um, tex, offsets) -> None:
    """Add ink optical density to `od` (3, h, w) in place; pen = (stroke index, µm inside
    the stroke edge) on the grid."""
    index, inside_um = pen
    alpha = np.clip(inside_um / 2.0 + 0.5, 0, 1).astype(np.float32)
    mid = _tex_grid(tex, "mid", 2, offsets, ys_um, xs_um)
    amount = alpha * (1.25 + 0.15 * mid)  # dense marker ink: mostly hides the tissue
    ink = _INK_OD.astype(np.float32)[np.asarray(colours)[index]]  # (h, w, 3)
    od += amount[None] * np.moveaxis(ink, -1, 0)
