"""Synthetic H&E / IHC slide scene with exact ground truth: layout, cells and rendering.

A :class:`SyntheticScene` is a pure function of its arguments (seed included): any region
renders at any downsample, with its region label mask and its cell list, without ever
building the whole slide. The TIFF writer and truth files live in :mod:`tilscore.synth`.

Layout. Smooth random fields on a coarse grid (``FIELD_UM`` µm/px, so even a 25 x 20 mm
slide's fields are ~1600 x 1300 float64) are bilinearly interpolated to any point, plus a
fine periodic roughness texture (so boundaries are not polygonal). A point's region is::

    0 background  if tissue <= 0  (or under a pen stroke: see below)
    3 other       elif other > 0  (necrosis-like or fat-like, by a fourth field's sign)
    1 tumour      elif tumour > 0
    2 stroma      otherwise

Pen marks (``pen_marks=True``) are ink drawn over the slide; the ink is rendered over tissue,
but the truth treats pen-covered pixels as not scorable: region label 0, not in
``tissue_mask``, their cells left out of :meth:`SyntheticScene.cells` and of the truth.

Cells are a Matérn type-II hard-core process per 256 µm block (seeded from (seed, block)):
candidates (a jittered hexagonal lattice of tumour cells; Poisson lymphocytes, fibroblasts
and "other" cells) are thinned wherever two would overlap, the lower priority one losing
(lymphocytes always win). Thinning only looks at candidates within 13.5 µm, so any region's
cells are exact and independent of how the slide is split into queries. Lymphocyte
candidate intensity is inflated so that the *retained* density matches the configured one.

Rendering is Beer–Lambert: per-pixel stain concentrations (region background plus nuclei,
membranes and ink) times optical-density vectors, ``rgb = 255 * exp(-OD)``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
from scipy.ndimage import distance_transform_edt
from scipy.spatial import cKDTree

from tilscore.errors import UsageError
from tilscore.synth.paint import (
    _MAX_RADIUS_UM,
    KIND_FIBRO,
    KIND_LYMPH,
    KIND_OTHER,
    KIND_TUMOUR,
    MARGIN_UM,
    paint_nuclei,
    paint_pen,
    paint_regions,
    sample_grid,
    sample_points,
    smooth_noise,
    stain_od_matrix,
    textures,
)

STAINS = ("he", "cd20", "foxp3")
REGION_CODES = {"background": 0, "tumour": 1, "stroma": 2, "other": 3}
COMPARTMENTS = np.array(["background", "tumour", "stroma", "other"])
# Cell kinds (internal) and the class each reports in cells()["cls"].
CLASS_OF_KIND = np.array(["lymphocyte", "tumour", "other", "other"])
# Finer cell type of each kind (training targets: fibroblasts are stromal cells).
TYPE_OF_KIND = np.array(["lymphocyte", "tumour", "stromal", "other"])
CELL_CLASSES = ("lymphocyte", "tumour", "other")

FIELD_UM = 16.0  # coarse layout grid spacing
_PAD = 2  # coarse grid cells beyond each slide edge
BLOCK_UM = 256.0  # cell generation block
LYMPH_RADIUS_UM = 3.5  # 7 µm round nuclei (the sTIL % area per lymphocyte)
_GAP_UM = 0.5  # minimum free space between two nuclei's bounding circles
_CONFLICT_UM = 2 * _MAX_RADIUS_UM + _GAP_UM
_TUMOUR_PITCH_UM = 13.0  # hexagonal lattice of tumour-cell sites
_TUMOUR_JITTER_UM = 1.2
_TUMOUR_OCCUPANCY = 0.9
_ROUGH_AMP = {"tissue": 3.0, "other": 3.0, "tumour": 2.0}  # boundary roughness (s.d.), µm
_DEFAULT_POSITIVE = {"he": 0.0, "cd20": 0.35, "foxp3": 0.15}
_CACHE_BLOCKS = 512


@dataclass(frozen=True)
class SceneParams:
    """Scene knobs (keyword arguments of :class:`SyntheticScene`), with defaults.

    Densities are cells per mm² of the compartment; fractions are of the slide area
    (tissue) or of the tissue area (tumour, other). ``positive_fraction`` None means the
    stain default (0.35 CD20, 0.15 FOXP3; CD20+ and FOXP3+ cells are disjoint sets).
    ``lymphocyte_clustering`` is the s.d. of a log-normal density multiplier (hotspots).
    ``blur_sigma_px`` is a Gaussian defocus blur in level-0 pixels (0 = sharp).
    """

    lymphocyte_density_stroma_per_mm2: float = 1500.0
    lymphocyte_density_tumour_per_mm2: float = 300.0
    positive_fraction: float | None = None
    pen_marks: bool = False
    blur_sigma_px: float = 0.0
    tissue_fraction: float = 0.6
    tumour_fraction: float = 0.38
    other_fraction: float = 0.07
    lymphocyte_clustering: float = 0.5
    fibroblast_density_per_mm2: float = 500.0
    other_cell_density_per_mm2: float = 150.0

    def validate(self) -> None:
        for name in ("tissue_fraction", "tumour_fraction", "other_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UsageError(f"synthetic scene: {name} must be in (0, 1)")
        if self.tumour_fraction + self.other_fraction >= 0.95:
            raise UsageError("synthetic scene: tumour_fraction + other_fraction must be < 0.95")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise UsageError(f"synthetic scene: {f.name} must be >= 0, got {value}")
        if self.positive_fraction is not None and not 0.0 <= self.positive_fraction <= 1.0:
            raise UsageError("synthetic scene: positive_fraction must be in [0, 1]")


def make_params(knobs: dict) -> SceneParams:
    """SceneParams from keyword knobs; UsageError naming the valid knobs on a typo."""
    valid = [f.name for f in fields(SceneParams)]
    unknown = sorted(set(knobs) - set(valid))
    if unknown:
        raise UsageError(f"unknown synthetic scene option(s) {unknown}; valid: {valid}")
    params = SceneParams(**knobs)
    params.validate()
    return params


class SyntheticScene:
    """A deterministic synthetic slide (see the module docstring for the model).

    Args:
        width_px, height_px: level-0 size. mpp: µm per level-0 pixel.
        stain: "he", "cd20" or "foxp3". seed: int >= 0 (different seeds, different layouts;
            the layout and cells do not depend on the stain, like serial sections).
        **knobs: :class:`SceneParams` fields.
    """

    def __init__(self, width_px: int, height_px: int, mpp: float = 0.25, stain: str = "he",
                 seed: int = 0, **knobs):
        if stain not in STAINS:
            raise UsageError(f"unknown stain {stain!r}; valid: {list(STAINS)}")
        if int(width_px) < 64 or int(height_px) < 64 or not 0.05 <= float(mpp) <= 20.0:
            raise UsageError(f"synthetic slide too small or bad mpp: {width_px}x{height_px}"
                             f" px at {mpp} µm/px")
        if int(seed) < 0:
            raise UsageError(f"seed must be >= 0, got {seed}")
        self.width_px, self.height_px = int(width_px), int(height_px)
        self.mpp, self.stain, self.seed = float(mpp), stain, int(seed)
        self.params = make_params(knobs)
        p = self.params
        self.positive_fraction = (_DEFAULT_POSITIVE[stain] if p.positive_fraction is None
                                  else float(p.positive_fraction))
        if stain == "he":
            self.positive_fraction = 0.0
        self.width_um, self.height_um = self.width_px * self.mpp, self.height_px * self.mpp
        self._tex = textures()
        # Separate streams, so that e.g. turning pen marks on leaves the layout unchanged.
        rng = np.random.default_rng([self.seed, 1])
        self._tex_offset = rng.integers(0, 1 << 20, size=(8, 2)).astype(np.float64)
        self._build_fields(rng)
        self._lattice = self._build_lattice(np.random.default_rng([self.seed, 3]))
        self._pen_colour, self._pen_fields = (
            self._build_pens(np.random.default_rng([self.seed, 4])) if p.pen_marks else ([], []))
        self._od = stain_od_matrix(stain)
        self._lock = threading.Lock()
        self._block_cache: OrderedDict = OrderedDict()

    def knobs(self) -> dict:
        """The scene knobs as a plain dict (for truth files)."""
        return asdict(self.params)

    # -- layout fields ----------------------------------------------------------------
    def _grid_shape(self) -> tuple[int, int]:
        ny = int(math.ceil(self.height_um / FIELD_UM)) + 2 * _PAD + 1
        nx = int(math.ceil(self.width_um / FIELD_UM)) + 2 * _PAD + 1
        return ny, nx

    def _build_fields(self, rng: np.random.Generator) -> None:
        """Coarse float64 fields (ny, nx); a region is where its field is > 0."""
        p = self.params
        shape = self._grid_shape()
        ys = (np.arange(shape[0]) - _PAD) * FIELD_UM
        xs = (np.arange(shape[1]) - _PAD) * FIELD_UM
        inside = ((ys[:, None] >= 0) & (ys[:, None] <= self.height_um)
                  & (xs[None, :] >= 0) & (xs[None, :] <= self.width_um))
        side_um = min(self.width_um, self.height_um)

        def noise(sigma_um: float) -> np.ndarray:
            return smooth_noise(rng, shape, sigma_px=sigma_um / FIELD_UM)

        u = (xs[None, :] - self.width_um / 2) / (0.45 * self.width_um)
        v = (ys[:, None] - self.height_um / 2) / (0.45 * self.height_um)
        tissue = noise(0.15 * side_um) + 0.4 * noise(0.04 * side_um) + 1.3 * (1 - u**2 - v**2)
        edge_um = np.minimum(np.minimum(ys[:, None], self.height_um - ys[:, None]),
                             np.minimum(xs[None, :], self.width_um - xs[None, :]))
        tissue -= 8.0 * np.clip(1.0 - edge_um / (0.15 * side_um), 0.0, 1.0) ** 2
        margin = edge_um < max(2 * FIELD_UM, 0.04 * side_um)
        tissue -= np.quantile(np.where(margin, -1e3, tissue)[inside], 1.0 - p.tissue_fraction)
        tissue = _as_distance_um(tissue, inside & ~margin)
        tissue[margin] = np.minimum(tissue[margin], -FIELD_UM)
        in_tissue = inside & (tissue > 0)

        other = noise(120.0) + 0.4 * noise(40.0)
        other -= np.quantile(other[in_tissue], 1.0 - p.other_fraction)
        tumour = noise(35.0) + 0.8 * noise(90.0) + 0.4 * noise(400.0)
        pool = tumour[in_tissue & (other <= 0)]
        tumour -= np.quantile(pool, 1.0 - p.tumour_fraction / (1.0 - p.other_fraction))
        other, tumour = _as_distance_um(other, in_tissue), _as_distance_um(tumour, in_tissue)
        clustering = p.lymphocyte_clustering
        hot = np.exp(clustering * noise(100.0) - clustering**2 / 2)
        self._fields = {
            "tissue": tissue, "other": other, "tumour": tumour,
            # appearance only (float32): > 0 "other" looks necrotic, else fat; collagen
            # direction as (cos 2θ, sin 2θ)
            "necrosis": noise(300.0).astype(np.float32),
            "fibre_c": noise(60.0).astype(np.float32),
            "fibre_s": noise(60.0).astype(np.float32),
            "hot": np.minimum(hot, 4.0),  # lymphocyte density multiplier
        }

    def _build_pens(self, rng: np.random.Generator) -> tuple[list[int], list[np.ndarray]]:
        """2-3 curved strokes: per stroke an ink index and a coarse field (µm inside edge)."""
        shape = self._grid_shape()
        colours, pens = [], []
        diag_um = math.hypot(self.width_um, self.height_um)
        for _ in range(int(rng.integers(2, 4))):
            start = rng.uniform([0.1, 0.1], [0.9, 0.9]) * [self.width_um, self.height_um]
            angle = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.3, 0.6) * diag_um
            end = start + length * np.array([math.cos(angle), math.sin(angle)])
            ctrl = (start + end) / 2 + rng.normal(0, 0.15 * length, 2)
            t = np.linspace(0, 1, 200)[:, None]
            curve = (1 - t) ** 2 * start + 2 * t * (1 - t) * ctrl + t**2 * end
            grid_pts = np.round((curve / FIELD_UM + _PAD) * 16).astype(np.int32)
            line = np.zeros(shape, np.uint8)
            cv2.polylines(line, [grid_pts], False, 1, 1, cv2.LINE_8, 4)
            dist_um = distance_transform_edt(line == 0) * FIELD_UM
            pens.append(rng.uniform(100.0, 200.0) - dist_um)
            colours.append(int(rng.integers(0, 3)))
        return colours, pens

    def _region_values(self, ys_um: np.ndarray, xs_um: np.ndarray, grid: bool) -> dict:
        """Field values at points (grid=False: ys, xs same shape) or on the grid ys x xs."""
        tex = self._tex["rough"]
        out = {}
        for k, name in enumerate(("tissue", "other", "tumour")):
            fy = ys_um / FIELD_UM + _PAD
            fx = xs_um / FIELD_UM + _PAD
            ty = ys_um / tex.res_um + self._tex_offset[k, 0]
            tx = xs_um / tex.res_um + self._tex_offset[k, 1]
            if grid:
                value = sample_grid(self._fields[name], ypos=fy, xpos=fx)
                value += _ROUGH_AMP[name] * sample_grid(tex.data, ypos=ty, xpos=tx, wrap=True)
            else:
                value = sample_points(self._fields[name], ypos=fy, xpos=fx)
                value += _ROUGH_AMP[name] * sample_points(tex.data, ypos=ty, xpos=tx, wrap=True)
            out[name] = value
        return out

    def _pen_values(self, ys_um, xs_um, grid: bool) -> np.ndarray | None:
        """(stroke index, µm inside the stroke edge), max over strokes; None when no pens."""
        if not self._pen_fields:
            return None
        fy, fx = ys_um / FIELD_UM + _PAD, xs_um / FIELD_UM + _PAD
        fn = sample_grid if grid else sample_points
        vals = np.stack([fn(f, ypos=fy, xpos=fx) for f in self._pen_fields])
        return vals.argmax(axis=0), vals.max(axis=0)

    @staticmethod
    def _labels_from(values: dict) -> np.ndarray:
        labels = np.where(values["tumour"] > 0, 1, 2).astype(np.uint8)
        labels[values["other"] > 0] = 3
        labels[values["tissue"] <= 0] = 0
        return labels

    def labels_um(self, ys_um: np.ndarray, xs_um: np.ndarray, *, grid: bool = True,
                  with_pen: bool = True) -> np.ndarray:
        """uint8 region codes at µm positions (grid: (len(ys), len(xs)); else ys.shape).

        ``with_pen`` sets pen-covered pixels to 0 (the truth convention)."""
        labels = self._labels_from(self._region_values(ys_um, xs_um, grid))
        if with_pen:
            pen = self._pen_values(ys_um, xs_um, grid)
            if pen is not None:
                labels[pen[1] > 0] = 0
        return labels

    def _chunked_grid(self, fn, height: int, width: int, x_px: float, y_px: float,
                      step_px: float, dtype) -> np.ndarray:
        """(height, width) array of fn(ys_um, xs_um) at pixel centres level-0
        (x + (j+0.5)*step, y + (i+0.5)*step), evaluated in 1024² chunks."""
        out = np.empty((height, width), dtype)
        for i0 in range(0, height, 1024):
            ys = (y_px + (np.arange(i0, min(i0 + 1024, height)) + 0.5) * step_px) * self.mpp
            for j0 in range(0, width, 1024):
                xs = (x_px + (np.arange(j0, min(j0 + 1024, width)) + 0.5) * step_px) * self.mpp
                out[i0:i0 + ys.size, j0:j0 + xs.size] = fn(ys, xs)
        return out

    # -- public masks -----------------------------------------------------------------
    def region_labels(self, x: float, y: float, *, width: int, height: int,
                      downsample: float = 1.0) -> np.ndarray:
        """uint8 (height, width) region codes (0 bg/pen, 1 tumour, 2 stroma, 3 other).

        Output pixel (i, j) is sampled at level-0 (x + (j+0.5)*ds, y + (i+0.5)*ds)."""
        return self._chunked_grid(self.labels_um, height, width, x, y, float(downsample),
                                  np.uint8)

    def _mask_grid(self, fn, mpp: float) -> np.ndarray:
        h = max(1, int(math.ceil(self.height_um / mpp)))
        w = max(1, int(math.ceil(self.width_um / mpp)))
        return self._chunked_grid(fn, h, w, 0.0, 0.0, mpp / self.mpp, bool)

    def tissue_mask(self, mpp: float = 8.0) -> np.ndarray:
        """True tissue (not under pen) at `mpp` µm/px: bool (ceil(H_um/mpp), ceil(W_um/mpp))."""
        return self._mask_grid(lambda ys, xs: self.labels_um(ys, xs) > 0, mpp)

    def pen_mask(self, mpp: float = 8.0) -> np.ndarray:
        """Pixels under pen ink at `mpp` µm/px (all False without pen marks); shape as
        :meth:`tissue_mask`."""
        def fn(ys, xs):
            pen = self._pen_values(ys, xs, True)
            return np.zeros((ys.size, xs.size), bool) if pen is None else pen[1] > 0

        return self._mask_grid(fn, mpp)

    def label_areas_mm2(self, step_um: float = 2.0) -> dict[str, float]:
        """Region areas (mm², pen excluded) by the midpoint rule on a `step_um` grid.

        The region boundaries are smooth on a 16 µm scale (with ~5 µm roughness), so at
        2 µm the relative error is ~1e-3 (measured against 1 µm: < 0.1 %)."""
        h = int(math.ceil(self.height_um / step_um))
        w = int(math.ceil(self.width_um / step_um))
        counts = np.zeros(4, np.int64)
        for y0 in range(0, h, 1024):
            ys = (np.arange(y0, min(y0 + 1024, h)) + 0.5) * step_um
            for x0 in range(0, w, 1024):
                xs = (np.arange(x0, min(x0 + 1024, w)) + 0.5) * step_um
                counts += np.bincount(self.labels_um(ys, xs).ravel(), minlength=4)
        # Samples beyond the slide edge are background (the edge margin is never tissue).
        cell_mm2 = (step_um / 1000.0) ** 2
        areas = {name: float(counts[code]) * cell_mm2
                 for name, code in REGION_CODES.items() if code > 0}
        areas["tissue"] = areas["tumour"] + areas["stroma"] + areas["other"]
        return areas

    # -- cells ------------------------------------------------------------------------
    def _build_lattice(self, rng: np.random.Generator) -> np.ndarray:
        """3x2 [origin, a1, a2] of the rotated hexagonal tumour-cell lattice (µm)."""
        phi = rng.uniform(0, math.pi / 3)
        a1 = _TUMOUR_PITCH_UM * np.array([math.cos(phi), math.sin(phi)])
        a2 = _TUMOUR_PITCH_UM * np.array([math.cos(phi + math.pi / 3),
                                          math.sin(phi + math.pi / 3)])
        return np.stack([rng.uniform(0, _TUMOUR_PITCH_UM, 2), a1, a2])

    def _lymph_intensity(self, target_per_mm2: np.ndarray) -> np.ndarray:
        """Candidate intensity (per µm²) whose Matérn-II thinning keeps `target` per mm²."""
        area_um2 = math.pi * (2 * LYMPH_RADIUS_UM + _GAP_UM) ** 2
        kept = np.minimum(np.asarray(target_per_mm2) * 1e-6 * area_um2, 0.9)
        return -np.log1p(-kept) / area_um2

    def _block_candidates(self, bx: int, by: int) -> dict:
        """All candidate cells of block (bx, by), before thinning; cached."""
        key = (bx, by)
        with self._lock:
            if key in self._block_cache:
                self._block_cache.move_to_end(key)
                return self._block_cache[key]
        cand = self._make_candidates(bx, by)
        with self._lock:
            self._block_cache[key] = cand
            while len(self._block_cache) > _CACHE_BLOCKS:
                self._block_cache.popitem(last=False)
        return cand

    def _make_candidates(self, bx: int, by: int) -> dict:
        """Candidates of one block: tumour lattice sites, then Poisson lymphocytes,
        fibroblasts and other cells; each kept with probability ``p_keep`` where its
        region allows it. Only (seed, bx, by) drive the draws."""
        p = self.params
        rng = np.random.default_rng([self.seed, 2, bx, by])
        x0, y0 = bx * BLOCK_UM, by * BLOCK_UM
        x1, y1 = min(x0 + BLOCK_UM, self.width_um), min(y0 + BLOCK_UM, self.height_um)
        origin, a1, a2 = self._lattice  # sites whose unjittered position is in the block
        corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) - origin
        ij = corners @ np.linalg.inv(np.stack([a1, a2]))
        lo, hi = np.floor(ij.min(0)) - 1, np.ceil(ij.max(0)) + 1
        ii, jj = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
        sites = origin + ii.reshape(-1, 1) * a1 + jj.reshape(-1, 1) * a2
        sites = sites[(sites[:, 0] >= x0) & (sites[:, 0] < x1)
                      & (sites[:, 1] >= y0) & (sites[:, 1] < y1)]
        n = len(sites)
        r, t = _TUMOUR_JITTER_UM * np.sqrt(rng.random(n)), rng.uniform(0, 2 * math.pi, n)
        a = rng.uniform(4.6, 6.0, n)
        kinds, pos = [np.full(n, KIND_TUMOUR)], [sites + np.stack([r * np.cos(t),
                                                                   r * np.sin(t)], 1)]
        semi_a, semi_b = [a], [a * rng.uniform(0.75, 0.95, n)]
        lam_lymph = float(self._lymph_intensity(4.0 * max(
            p.lymphocyte_density_tumour_per_mm2, p.lymphocyte_density_stroma_per_mm2)))
        for kind, lam in ((KIND_LYMPH, lam_lymph),
                          # about half the fibroblast candidates lose to lymphocytes
                          (KIND_FIBRO, 2.0 * p.fibroblast_density_per_mm2 * 1e-6),
                          (KIND_OTHER, p.other_cell_density_per_mm2 * 1e-6)):
            n = int(rng.poisson(lam * max(x1 - x0, 0) * max(y1 - y0, 0)))
            kinds.append(np.full(n, kind))
            pos.append(rng.uniform([x0, y0], [x1, y1], size=(n, 2)))
            if kind == KIND_LYMPH:
                semi_a.append(np.full(n, LYMPH_RADIUS_UM))
                semi_b.append(semi_a[-1])
            elif kind == KIND_FIBRO:  # spindle ~12 x 4 µm
                semi_a.append(rng.uniform(5.0, 7.0, n))
                semi_b.append(rng.uniform(1.6, 2.4, n))
            else:
                semi_a.append(rng.uniform(2.0, 3.5, n))
                semi_b.append(semi_a[-1] * rng.uniform(0.6, 1.0, n))
        kind = np.concatenate(kinds).astype(np.int8)
        xy = np.concatenate(pos).reshape(-1, 2)
        n = kind.size
        cells = {"x_um": xy[:, 0], "y_um": xy[:, 1], "kind": kind,
                 "a_um": np.concatenate(semi_a), "b_um": np.concatenate(semi_b),
                 "angle": rng.uniform(0, math.pi, n), "prio": rng.random(n) + (3 - kind),
                 "u_pos": rng.random(n), "tone": rng.uniform(0.85, 1.15, n),
                 "nucleolus": rng.uniform(0, 2 * math.pi, n),
                 "tex": rng.integers(0, 1 << 16, size=(n, 2))}
        u_keep = rng.random(n)
        label = self.labels_um(cells["y_um"], cells["x_um"], grid=False, with_pen=False)
        cells["label"] = label
        fy, fx = cells["y_um"] / FIELD_UM + _PAD, cells["x_um"] / FIELD_UM + _PAD
        p_keep = np.where(kind == KIND_TUMOUR, _TUMOUR_OCCUPANCY, 1.0)
        target = np.where(label == 1, p.lymphocyte_density_tumour_per_mm2,
                          p.lymphocyte_density_stroma_per_mm2)
        target = target * sample_points(self._fields["hot"], ypos=fy, xpos=fx)
        p_keep = np.where(kind == KIND_LYMPH, self._lymph_intensity(target) / lam_lymph,
                          p_keep)
        region_ok = (((kind == KIND_TUMOUR) & (label == 1))
                     | ((kind == KIND_LYMPH) & ((label == 1) | (label == 2)))
                     | ((kind == KIND_FIBRO) & (label == 2))
                     | ((kind == KIND_OTHER) & (label == 3)))
        fibre = kind == KIND_FIBRO  # fibroblasts follow the local collagen direction
        along = 0.5 * np.arctan2(sample_points(self._fields["fibre_s"], ypos=fy, xpos=fx),
                                 sample_points(self._fields["fibre_c"], ypos=fy, xpos=fx))
        cells["angle"] = np.where(fibre, along + 0.25 * (cells["angle"] - 1.5), cells["angle"])
        keep = region_ok & (u_keep < p_keep)
        return {k: v[keep] for k, v in cells.items()}

    def cells_um(self, x0_um: float, y0_um: float, *, x1_um: float, y1_um: float) -> dict:
        """Thinned cells with centre in [x0, x1) x [y0, y1) µm, pen ignored (for painting).

        Dict of arrays (internal attributes: x_um, y_um, kind, a_um, b_um, angle, ...)."""
        c = _CONFLICT_UM
        bx0, bx1 = max(0, int((x0_um - c) // BLOCK_UM)), int((x1_um + c) // BLOCK_UM)
        by0, by1 = max(0, int((y0_um - c) // BLOCK_UM)), int((y1_um + c) // BLOCK_UM)
        bx1 = min(bx1, int(math.ceil(self.width_um / BLOCK_UM)) - 1)
        by1 = min(by1, int(math.ceil(self.height_um / BLOCK_UM)) - 1)
        blocks = [self._block_candidates(bx, by)
                  for by in range(by0, by1 + 1) for bx in range(bx0, bx1 + 1)]
        if not blocks:
            return {k: v[:0] for k, v in self._block_candidates(0, 0).items()}
        cand = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
        near = ((cand["x_um"] >= x0_um - c) & (cand["x_um"] < x1_um + c)
                & (cand["y_um"] >= y0_um - c) & (cand["y_um"] < y1_um + c))
        cand = {k: v[near] for k, v in cand.items()}
        keep = _matern_keep(cand)
        keep &= ((cand["x_um"] >= x0_um) & (cand["x_um"] < x1_um)
                 & (cand["y_um"] >= y0_um) & (cand["y_um"] < y1_um))
        return {k: v[keep] for k, v in cand.items()}

    def cells(self, x0: float, y0: float, *, x1: float, y1: float) -> dict:
        """Cells whose centre lies in level-0 px [x0, x1) x [y0, y1), pen-covered excluded.

        Returns a dict of 1-D arrays, one entry per cell: ``x_px``, ``y_px`` (float64,
        level-0 px, nucleus centre), ``cls`` (str: "lymphocyte", "tumour", "other" —
        fibroblasts and necrotic/fat cells are "other"), ``type`` (str: as ``cls`` but
        fibroblasts are "stromal"), ``compartment`` (str: region at the
        centre, "tumour"/"stroma"/"other"), ``positive`` (bool marker+; all False on H&E),
        ``radius_px`` (equal-area radius), ``major_px``/``minor_px`` (semi-axes),
        ``angle_rad`` (major axis from +x towards +y).
        """
        m = self.mpp
        raw = self.cells_um(x0 * m - 1.0, y0 * m - 1.0, x1_um=x1 * m + 1.0, y1_um=y1 * m + 1.0)
        x_px, y_px = raw["x_um"] / m, raw["y_um"] / m
        keep = (x_px >= x0) & (x_px < x1) & (y_px >= y0) & (y_px < y1)
        pen = self._pen_values(raw["y_um"], raw["x_um"], grid=False)
        if pen is not None:
            keep &= pen[1] <= 0
        raw = {k: v[keep] for k, v in raw.items()}
        return {
            "x_px": x_px[keep], "y_px": y_px[keep],
            "cls": CLASS_OF_KIND[raw["kind"]], "type": TYPE_OF_KIND[raw["kind"]],
            "compartment": COMPARTMENTS[raw["label"]],
            "positive": self._positive(raw),
            "radius_px": np.sqrt(raw["a_um"] * raw["b_um"]) / m,
            "major_px": raw["a_um"] / m, "minor_px": raw["b_um"] / m,
            "angle_rad": raw["angle"],
        }

    def _positive(self, raw: dict) -> np.ndarray:
        """Marker status: CD20+ uses u < f, FOXP3+ uses u > 1 - f (disjoint populations)."""
        lymph = raw["kind"] == KIND_LYMPH
        f = self.positive_fraction
        if self.stain == "cd20":
            return lymph & (raw["u_pos"] < f)
        if self.stain == "foxp3":
            return lymph & (raw["u_pos"] >= 1.0 - f)
        return np.zeros(lymph.shape, bool)

    # -- rendering --------------------------------------------------------------------
    def render(self, x: float, y: float, *, width: int, height: int, downsample: float = 1.0,
               supersample_um: float | None = None) -> np.ndarray:
        """uint8 RGB (height, width, 3); output pixel (i, j) covers level-0
        [x + j*ds, x + (j+1)*ds) x [y + i*ds, y + (i+1)*ds).

        For ds > 1 each output pixel is the mean of k x k rendered sub-pixels, k =
        ceil(ds*mpp / supersample_um) (default supersample_um = mpp: full resolution, so
        an integer ds equals the area-averaged level-0 image up to rounding)."""
        ds = float(downsample)
        if ds < 1.0:
            raise UsageError(f"downsample must be >= 1, got {ds}")
        sup = self.mpp if supersample_um is None else float(supersample_um)
        k = max(1, int(math.ceil(ds * self.mpp / sup - 1e-9)))
        out = np.empty((height, width, 3), np.uint8)
        chunk = max(1, 1024 // k)
        for i0 in range(0, height, chunk):
            for j0 in range(0, width, chunk):
                h, w = min(chunk, height - i0), min(chunk, width - j0)
                img = self._render_blurred(x + j0 * ds, y + i0 * ds, w * k, h * k, ds / k)
                if k > 1:
                    img = img.reshape(h, k, w, k, 3).mean(axis=(1, 3))
                out[i0:i0 + h, j0:j0 + w] = np.clip(np.rint(img), 0, 255)
        return out

    def _render_blurred(self, x, y, w, h, d) -> np.ndarray:
        sigma = self.params.blur_sigma_px / d
        if sigma <= 0:
            return self._render_float(x, y, w, h, d)

        m = int(math.ceil(3 * sigma)) + 1
        img = self._render_float(x - m * d, y - m * d, w + 2 * m, h + 2 * m, d)
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
        return img[m:m + h, m:m + w]

    def _render_float(self, x, y, w, h, d) -> np.ndarray:
        """float32 RGB (h, w, 3) in [0, 255]; pixel step d level-0 px, no blur/rounding."""
        xs_um = (x + (np.arange(w) + 0.5) * d) * self.mpp
        ys_um = (y + (np.arange(h) + 0.5) * d) * self.mpp
        values = self._region_values(ys_um, xs_um, grid=True)
        labels = self._labels_from(values)
        fy, fx = ys_um / FIELD_UM + _PAD, xs_um / FIELD_UM + _PAD
        necrosis = fibre = None  # appearance-only fields, where needed
        if np.any(labels == 3):
            necrosis = sample_grid(self._fields["necrosis"], ypos=fy, xpos=fx) > 0
        if np.any(labels == 2):
            fibre = (sample_grid(self._fields["fibre_c"], ypos=fy, xpos=fx),
                     sample_grid(self._fields["fibre_s"], ypos=fy, xpos=fx))
        conc = paint_regions(self.stain, labels, necrosis=necrosis, fibre=fibre, ys_um=ys_um,
                             xs_um=xs_um,
                             tex=self._tex, offsets=self._tex_offset)
        s_um = d * self.mpp
        cells = self.cells_um(xs_um[0] - MARGIN_UM, ys_um[0] - MARGIN_UM,
                              x1_um=xs_um[-1] + MARGIN_UM, y1_um=ys_um[-1] + MARGIN_UM)
        cells["positive"] = self._positive(cells)
        paint_nuclei(conc, cells, stain=self.stain, x0_um=xs_um[0], y0_um=ys_um[0], s_um=s_um,
                     tex=self._tex)
        # OD per RGB channel, channel-first (no BLAS: see sample_grid).
        od = np.stack([conc[0] * self._od[0, c] + conc[1] * self._od[1, c]
                       + conc[2] * self._od[2, c] for c in range(3)])
        pen = self._pen_values(ys_um, xs_um, grid=True)
        if pen is not None and np.any(pen[1] > -2.0):
            paint_pen(od, pen, colours=self._pen_colour, ys_um=ys_um, xs_um=xs_um, tex=self._tex,
                      offsets=self._tex_offset)
        np.maximum(od, 0.0, out=od)
        return np.moveaxis(255.0 * np.exp(-od), 0, -1)


def _as_distance_um(field: np.ndarray, where: np.ndarray) -> np.ndarray:
    """`field` divided by its median gradient (per µm) near its zero level in `where`, so
    that near boundaries it approximates the signed distance in µm (roughness amplitudes
    are then in µm whatever the field's scale)."""
    gy, gx = np.gradient(field, FIELD_UM)
    grad = np.hypot(gx, gy)[where]
    level = np.abs(field[where])
    near = level <= np.quantile(level, 0.05)
    return field / max(float(np.median(grad[near])), 1e-12)


def _matern_keep(cand: dict) -> np.ndarray:
    """Matérn type-II thinning: drop a candidate when a higher-priority one overlaps it."""
    n = cand["x_um"].size
    keep = np.ones(n, bool)
    if n < 2:
        return keep
    pts = np.stack([cand["x_um"], cand["y_um"]], axis=1)
    pairs = cKDTree(pts).query_pairs(_CONFLICT_UM, output_type="ndarray")
    if pairs.size == 0:
        return keep
    i, j = pairs[:, 0], pairs[:, 1]
    dist = np.hypot(pts[i, 0] - pts[j, 0], pts[i, 1] - pts[j, 1])
    conflict = dist < cand["a_um"][i] + cand["a_um"][j] + _GAP_UM
    loser = np.where(cand["prio"][i] < cand["prio"][j], i, j)
    keep[loser[conflict]] = False
    return keep
