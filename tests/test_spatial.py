"""Spatial measures on synthetic geometry with known answers (tilscore.scoring.spatial)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tilscore.scoring.spatial import (
    _exact,
    band_names,
    iter_signed_distance,
    spatial_measures,
)

MPP = 2.0


def _disc(h=600, w=700, cy=300.0, cx=320.0, r_px=100.0):
    """Tumour disc (radius r_px) in stroma; the rest of the map is stroma."""
    yy, xx = np.mgrid[:h, :w]
    lab = np.full((h, w), 2, np.uint8)
    lab[(yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r_px ** 2] = 1
    return lab


def _full(labels, core_px, max_um):
    return np.concatenate([d for _, _, _, d in iter_signed_distance(
        labels, labels.shape, mpp=MPP, max_distance_um=max_um, core_px=core_px)])


def test_signed_distance_of_a_disc_is_radial_and_tiling_does_not_change_it():
    lab = _disc()
    h, w = lab.shape
    yy, xx = np.mgrid[:h, :w]
    radial_um = (np.hypot(yy + 0.5 - 300.0, xx + 0.5 - 320.0) - 100.0) * MPP
    d = _full(lab, core_px=4096, max_um=2000)
    # pixel-centre distances to a pixelated circle: within ~1 px of the true radial one
    finite = np.isfinite(d)
    assert finite.all()
    assert np.abs(d - radial_um)[np.abs(radial_um) < 500].max() < 1.5 * MPP
    assert (d[lab == 1] < 0).all() and (d[lab == 2] > 0).all()
    # tiles of 64 px with a halo: identical where within max_distance, NaN beyond
    tiled = _full(lab, core_px=64, max_um=300)
    near = np.abs(d) <= 300
    assert np.array_equal(tiled[near], d[near])
    assert np.isnan(tiled[np.abs(d) > 300 + MPP]).all()
    # the transform equals scipy's exact EDT (signed, half-pixel border)
    from scipy.ndimage import distance_transform_edt

    tum = lab == 1
    ref = np.where(tum, -(distance_transform_edt(tum) - 0.5),
                   distance_transform_edt(~tum) - 0.5) * MPP
    assert np.abs(d - ref).max() < 1e-3


def test_bands_cells_and_nearest_tumour_cell_on_known_geometry():
    lab = _disc(r_px=100.0)  # radius 200 µm; centre (640, 600) µm
    cx_um, cy_um = 320 * MPP, 300 * MPP
    # counted cells on the +x axis at known signed distances (µm from the border)
    signed = np.array([-150.0, -50.0, 20.0, 60.0, 150.0, 300.0, 420.0])
    x = cx_um + 200.0 + signed
    y = np.full_like(x, cy_um)
    # tumour cells: one at the centre, one 10 µm inside the border on the -x axis
    tx = np.array([cx_um, cx_um - 190.0])
    ty = np.array([cy_um, cy_um])
    xs, ys = np.concatenate([x, tx]), np.concatenate([y, ty])
    counted = np.r_[np.ones(len(x), bool), np.zeros(2, bool)]
    dist, s = spatial_measures(lab, lab.shape, mpp=MPP, x_um=xs, y_um=ys, counted=counted,
                               tumour_cell=~counted, counted_class="lymphocyte",
                               edges_um=(100.0, 500.0), core_px=256)
    assert np.abs(dist[:len(x)] - signed).max() <= 1.5 * MPP
    names = band_names((100.0, 500.0))
    assert names == ["tumour", "stroma_0_100um", "stroma_100_500um", "stroma_over_500um"]
    assert s.counts == {"tumour": 2, "stroma_0_100um": 2, "stroma_100_500um": 3,
                        "stroma_over_500um": 0}
    # band areas: the disc (π r²) and annuli, clipped by the 1400 × 1200 µm map
    assert s.area_mm2["tumour"] == pytest.approx(math.pi * 0.2 ** 2, rel=0.01)
    assert s.area_mm2["stroma_0_100um"] == pytest.approx(math.pi * (0.3 ** 2 - 0.2 ** 2),
                                                         rel=0.02)
    total = 700 * 600 * MPP * MPP / 1e6
    assert sum(s.area_mm2.values()) == pytest.approx(total)
    assert s.densities_per_mm2["tumour"] == pytest.approx(2 / s.area_mm2["tumour"])
    assert s.median_distance_to_tumour_border_um == pytest.approx(60.0, abs=1.5 * MPP)
    # nearest tumour cell of each counted cell: the centre cell, at 200 + signed µm
    want = np.median(200.0 + signed)
    assert s.median_distance_to_nearest_tumour_cell_um == pytest.approx(want)
    assert s.tumour_cells == 2 and s.cells_measured == len(x)


def test_no_tumour_gives_nan_distances_and_no_medians():
    lab = np.full((100, 100), 2, np.uint8)
    dist, s = spatial_measures(lab, lab.shape, mpp=MPP, x_um=np.array([50.0]),
                               y_um=np.array([50.0]), counted=np.array([True]),
                               tumour_cell=np.array([False]), counted_class="cd20_positive")
    assert np.isnan(dist).all()
    assert s.median_distance_to_tumour_border_um is None
    assert s.median_distance_to_nearest_tumour_cell_um is None
    assert s.counts["stroma_over_500um"] == 1 and s.area_mm2["tumour"] == 0
    assert s.densities_per_mm2["tumour"] is None


class _LazyRows:
    """A tall label image made on demand, recording how many rows each read asks for."""

    def __init__(self, h, w):
        self.shape, self.reads = (h, w), []

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        self.reads.append(b - a)
        yy = np.arange(a, b)[:, None]
        lab = np.full((b - a, self.shape[1]), 2, np.uint8)
        lab[((yy // 500) % 2 == 0) & (np.arange(self.shape[1])[None] < 100)] = 1
        return lab


def test_distance_map_is_streamed_in_bounded_row_bands():
    labels = _LazyRows(20000, 300)  # 40 mm tall at 2 µm/px
    rows = 0
    for r0, r1, lab, d in iter_signed_distance(labels, labels.shape, mpp=MPP, max_distance_um=200.0,
                                               core_px=512):
        assert d.shape == (r1 - r0, 300) and lab.shape == d.shape
        rows += r1 - r0
    halo = int(np.ceil(200.0 / MPP)) + 1
    assert rows == 20000 and max(labels.reads) <= 512 + 2 * halo


def test_distances_are_the_correctly_rounded_root_whatever_the_last_bit():
    """OpenCV's transform may return a distance one bit off from run to run; the map is
    taken back to the correctly rounded root of the integer square, so cells.csv repeats."""
    squares = np.array([1, 2, 61, 1000, 250_000, 500_000], np.float32)
    exact = np.sqrt(squares)
    for direction in (np.inf, -np.inf):
        off = np.nextafter(exact, np.float32(direction)).astype(np.float32)
        assert not np.array_equal(off, exact)
        assert np.array_equal(_exact(off.copy()), exact)
