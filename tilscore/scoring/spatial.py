"""Where the immune cells sit relative to the tumour: signed distance to the tumour border,
densities in distance bands, distance to the nearest tumour cell.

Pure: a region label image (row-sliceable, e.g. the zarr-backed region map at 2 µm/px:
0 background, 1 tumour, 2 stroma, 3 other) and cell coordinates in, arrays and a
:class:`SpatialSummary` out.

**Signed distance** (µm) of a pixel to the tumour border: outside tumour, the Euclidean
distance from its centre to the nearest tumour pixel centre minus half a pixel (the
border runs along pixel edges); inside tumour, minus the distance to the nearest
non-tumour pixel centre, plus half a pixel. So it is negative inside tumour, and ±mpp/2
next to the border. It is computed by a tiled Euclidean distance transform
(OpenCV's exact ``distanceTransform``, checked against
``scipy.ndimage.distance_transform_edt``) on windows of ``core + 2 × halo`` pixels, the
halo being ``max_distance_um``: any tumour (or non-tumour) pixel within that distance of
a core pixel lies in its window, so every distance up to ``max_distance_um`` is exact
and farther ones are NaN ("farther than max_distance_um"). Memory: one band of
``core + 2 × halo`` rows of the label image, its distances and one window's
transforms at a time, whatever the slide's height (a 100k × 100k px slide at
0.25 µm/px, a 12,500 px wide map, with 2 million cells: 16 s and 0.75 GB peak on 2 CPU
cores, docs/data-formats.md). The slide's frame is not a border.

A cell's distance is its pixel's (the pixel holding its centre: ±1 px, ±1.4 µm at
2 µm/px).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from scipy.spatial import cKDTree

TUMOUR, STROMA = 1, 2  # region codes (tilscore.score.COMPARTMENT_OF_REGION)
DEFAULT_BAND_EDGES_UM = (100.0, 500.0)
MIN_MAX_DISTANCE_UM = 1000.0  # exact distances at least this far (and past the last band)
CORE_PX = 2048
AREA_ROWS = 256  # rows per slice when counting band areas


@dataclass
class SpatialSummary:
    """Per slide: areas (mm²), counts and densities (per mm²) of the counted cells in the
    bands (``tumour``, then stroma bands by distance from the border), the median signed
    distance of the counted cells to the tumour border and the median distance to their
    nearest tumour cell (µm; None when not measurable)."""

    counted_class: str
    band_edges_um: list[float]
    max_distance_um: float
    area_mm2: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    densities_per_mm2: dict[str, float | None] = field(default_factory=dict)
    cells_measured: int = 0
    median_distance_to_tumour_border_um: float | None = None
    median_distance_to_nearest_tumour_cell_um: float | None = None
    tumour_cells: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def band_names(edges_um: tuple[float, ...]) -> list[str]:
    """``tumour``, ``stroma_0_100um``, ``stroma_100_500um``, ``stroma_over_500um`` for
    edges (100, 500)."""
    lows = (0.0, *edges_um)
    names = ["tumour"]
    names += [f"stroma_{a:g}_{b:g}um" for a, b in zip(lows[:-1], lows[1:], strict=True)]
    return names + [f"stroma_over_{edges_um[-1]:g}um"]


def check_edges(edges_um) -> tuple[float, ...]:
    edges = tuple(float(e) for e in edges_um)
    if not edges or any(not math.isfinite(e) or e <= 0 for e in edges) or \
            any(b <= a for a, b in zip(edges[:-1], edges[1:], strict=True)):
        raise ValueError(f"band edges must be increasing positive µm, got {edges_um}")
    return edges


def _exact(d: np.ndarray) -> np.ndarray:
    """`d` (float32 Euclidean distances between pixel centres, in place) as the correctly
    rounded square root of its integer square. OpenCV's result differed in the last bit
    between identical runs of the golden slides (exact in isolation; its parallel or
    vector code paths are the likely source), which flipped a rounded distance in
    cells.csv. The squared distance is an
    integer, recovered exactly by rounding up to about 1,000 px (the default halo is
    501 px; farther, the result is still within 0.001 px), and IEEE square roots are
    correctly rounded on every path."""
    np.multiply(d, d, out=d)
    np.rint(d, out=d)
    return np.sqrt(d, out=d)


def _window_distance(window: np.ndarray, halo_px: int) -> np.ndarray:
    """Signed distance in px (float32) of every pixel of `window` (region codes), NaN
    where farther than `halo_px` from the border."""
    tumour = window == TUMOUR
    if not tumour.any() or tumour.all():  # no border within the window: all > halo
        return np.full(window.shape, np.nan, np.float32)
    # OpenCV's exact Euclidean transform (DIST_MASK_PRECISE; ~12x scipy's on 2 cores,
    # equal to scipy.ndimage.distance_transform_edt to float32 precision: tested)
    t8 = tumour.astype(np.uint8)
    d_out = _exact(cv2.distanceTransform(1 - t8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE))  # → tumour
    d_in = _exact(cv2.distanceTransform(t8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE))  # → non-tumour
    far = np.where(tumour, d_in, d_out) > halo_px  # (few temporaries: windows are big)
    d_out -= 0.5
    np.subtract(0.5, d_in, out=d_in)  # −(d_in − 0.5)
    out = np.where(tumour, d_in, d_out)
    out[far] = np.nan
    return out


def iter_signed_distance(labels, shape: tuple[int, int], *, mpp: float, max_distance_um: float,
                         core_px: int = CORE_PX) -> Iterator[tuple[int, int, np.ndarray,
                                                                      np.ndarray]]:
    """Row bands ``(r0, r1, labels[r0:r1], distance_um[r0:r1])`` of the signed distance
    map (float32 µm, NaN beyond `max_distance_um`) of `labels` ((h, w) region codes,
    sliced by rows: ``labels[a:b]`` → ndarray (b − a, w)), computed window by window."""
    h, w = shape
    halo = int(math.ceil(max_distance_um / mpp)) + 1
    for r0 in range(0, h, core_px):
        r1 = min(h, r0 + core_px)
        a, b = max(0, r0 - halo), min(h, r1 + halo)
        band = np.asarray(labels[a:b])[:, :w]
        dist = np.empty((r1 - r0, w), np.float32)
        for c0 in range(0, w, core_px):
            c1 = min(w, c0 + core_px)
            ca, cb = max(0, c0 - halo), min(w, c1 + halo)
            win = _window_distance(band[:, ca:cb], halo)
            dist[:, c0:c1] = win[r0 - a:r1 - a, c0 - ca:c1 - ca]
        dist *= np.float32(mpp)
        yield r0, r1, band[r0 - a:r1 - a], dist


def spatial_measures(labels, shape: tuple[int, int], *, mpp: float, x_um: np.ndarray,
                     y_um: np.ndarray, counted: np.ndarray, tumour_cell: np.ndarray,
                     counted_class: str, edges_um=DEFAULT_BAND_EDGES_UM,
                     max_distance_um: float | None = None, core_px: int = CORE_PX,
                     compartment: np.ndarray | None = None
                     ) -> tuple[np.ndarray, SpatialSummary]:
    """(signed distance µm of every cell (float32, NaN beyond `max_distance_um` or off the
    map), the slide's :class:`SpatialSummary`).

    `labels`: region codes (h, w) = `shape` at `mpp` µm/px, row-sliceable; `x_um`, `y_um`:
    cell centres; `counted`: bool, the cells the densities count (lymphocytes on H&E,
    marker-positive cells on IHC); `tumour_cell`: bool, the reference cells of the
    nearest-tumour-cell distance. Bands: ``tumour`` (tumour pixels), then stroma pixels at
    [0, e1), [e1, e2), ..., ≥ e_last µm from the border (`edges_um`). A cell's band is
    that of its pixel, or with `compartment` (str per cell, the cell table's: the region
    around the cell, tilscore.aggregate) ``tumour`` for a tumour cell and the stroma band
    of its distance (≤ 0 counts as the first) for a stroma cell, so the bands split the
    summary's compartment counts exactly."""
    edges = check_edges(edges_um)
    max_um = max(MIN_MAX_DISTANCE_UM, 2 * edges[-1]) if max_distance_um is None \
        else float(max_distance_um)
    if max_um < edges[-1]:
        raise ValueError(f"max_distance_um {max_um} below the last band edge {edges[-1]}")
    names = band_names(edges)
    x_um, y_um = np.asarray(x_um, float), np.asarray(y_um, float)
    counted, tumour_cell = np.asarray(counted, bool), np.asarray(tumour_cell, bool)
    n = len(x_um)
    h, w = shape
    rows = np.floor(y_um / mpp).astype(np.int64)
    cols = np.floor(x_um / mpp).astype(np.int64)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    cell_dist = np.full(n, np.nan, np.float32)
    cell_band = np.full(n, -1, np.int64)  # index into names; -1: no band (other, glass)
    area_px = np.zeros(len(names), np.int64)
    order = np.argsort(np.where(inside, rows, -1), kind="stable")
    sorted_rows = np.where(inside, rows, -1)[order]
    bins = np.array(edges, np.float32)
    for r0, r1, lab, dist in iter_signed_distance(labels, shape, mpp=mpp, max_distance_um=max_um,
                                                  core_px=core_px):
        for k in range(0, r1 - r0, AREA_ROWS):  # in slices: few temporaries at a time
            lab_k, dist_k = lab[k:k + AREA_ROWS], dist[k:k + AREA_ROWS]
            area_px[0] += int(np.count_nonzero(lab_k == TUMOUR))
            # stroma beyond max_distance (NaN) is beyond the last edge
            sd = dist_k[lab_k == STROMA]
            idx = np.searchsorted(bins, np.where(np.isnan(sd), np.inf, sd), side="right")
            area_px[1:] += np.bincount(idx, minlength=len(edges) + 1)  # 0: [0, e1), ...
        lo, hi = np.searchsorted(sorted_rows, [r0, r1])
        sel = order[lo:hi]
        if not len(sel):
            continue
        rr, cc = rows[sel] - r0, cols[sel]
        cell_dist[sel] = dist[rr, cc]
        code = lab[rr, cc]
        d = np.where(np.isnan(dist[rr, cc]), np.inf, dist[rr, cc])
        if compartment is not None:
            comp = np.asarray(compartment)[sel]
            code = np.where(comp == "tumour", TUMOUR, np.where(comp == "stroma", STROMA, 0))
            d = np.maximum(d, 0.0)
        band = np.where(code == TUMOUR, 0,
                        np.where(code == STROMA, 1 + np.searchsorted(bins, d, side="right"),
                                 -1))
        cell_band[sel] = band
    area_mm2 = area_px * (mpp * mpp) / 1e6
    counts = np.bincount(cell_band[counted & (cell_band >= 0)], minlength=len(names))
    summary = SpatialSummary(counted_class, list(edges), max_um)
    for k, name in enumerate(names):
        summary.area_mm2[name] = float(area_mm2[k])
        summary.counts[name] = int(counts[k])
        summary.densities_per_mm2[name] = (float(counts[k] / area_mm2[k]) if area_mm2[k] > 0
                                           else None)
    # median signed distance; beyond max_distance counts as ±infinity by its side
    mine = counted & inside
    if mine.any():
        cd = cell_dist[mine].astype(float)
        lab_at = cell_band[mine]
        cd = np.where(np.isnan(cd), np.where(lab_at == 0, -np.inf, np.inf), cd)
        med = float(np.median(cd))
        summary.median_distance_to_tumour_border_um = med if math.isfinite(med) else None
        summary.cells_measured = int(mine.sum())
    summary.tumour_cells = int(tumour_cell.sum())
    if counted.any() and tumour_cell.any():
        summary.median_distance_to_nearest_tumour_cell_um = nearest_distance_median(
            np.stack([x_um[counted], y_um[counted]], 1),
            np.stack([x_um[tumour_cell], y_um[tumour_cell]], 1))
    return cell_dist, summary


def nearest_distance_median(points_um: np.ndarray, reference_um: np.ndarray) -> float | None:
    """Median over `points_um` (n, 2) of the distance (µm) to the nearest point of
    `reference_um` (m, 2) (a k-d tree; a point in both sets is ignored as its own
    neighbour only when `points` and `reference` are the same cells, which they are not
    here: positive cells vs tumour cells)."""
    if not len(points_um) or not len(reference_um):
        return None
    d, _ = cKDTree(reference_um).query(points_um, k=1)
    return float(np.median(d))


def slide_spatial(canvas, cells: dict, *, stain: str, extent_um: tuple[float, float],
                  edges_um=DEFAULT_BAND_EDGES_UM) -> tuple[np.ndarray, dict]:
    """The pipeline's call: (signed distance µm per cell of `cells` (the cell table),
    summary ``spatial`` dict) from the region canvas (``labels_within``, ``mpp``). Counted
    cells: lymphocytes on H&E, ``<stain>_positive`` on IHC; reference tumour cells: the
    ``tumour`` class on H&E, on IHC the other (negative) cells in the tumour
    compartment (IHC detects no tumour class)."""
    labels = canvas.labels_within(extent_um)
    cls = np.asarray(cells["class"])
    counted_class = "lymphocyte" if stain == "he" else f"{stain}_positive"
    counted = cls == counted_class
    tumour = (cls == "tumour") if stain == "he" else \
        (np.asarray(cells["compartment"]) == "tumour") & ~counted
    dist, summary = spatial_measures(labels, labels.shape, mpp=canvas.mpp, x_um=cells["x_um"],
                                     y_um=cells["y_um"], counted=counted, tumour_cell=tumour,
                                     counted_class=counted_class, edges_um=edges_um,
                                     compartment=np.asarray(cells["compartment"]))
    return dist, summary.as_dict()
