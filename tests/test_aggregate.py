"""Streaming region aggregation: one pass of block counts against a per-pixel reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tilscore.scoring.aggregate import region_summary
from tilscore.scoring.score import ScoreConfig, tumour_bulk


def _canvas(h: int, w: int, seed: int = 0):
    """A region map at 2 µm/px: tumour nests in stroma, other tissue and glass, with
    random nucleus coverage; sizes that are not multiples of the coarse factor or band."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    labels = np.zeros((h, w), np.uint8)
    labels[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * min(h, w)) ** 2] = 2
    for cy, cx in rng.uniform(0.3, 0.7, (12, 2)) * (h, w):  # nests
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(8, 30) ** 2] = 1
    labels[(rng.random((h, w)) < 0.02) & (labels > 0)] = 3
    nuclei = rng.integers(0, 256, (h, w), dtype=np.uint8)
    return SimpleNamespace(labels=labels, nuclei=nuclei, shape=(h, w), chunk=112, mpp=2.0)


def _reference(canvas, cfg: ScoreConfig):
    """The per-pixel definition: coarse fractions as block means (edge blocks padded
    with glass); areas as pixel sums, the bulk upsampled to the pixels."""
    f = int(round(cfg.coarse_mpp / canvas.mpp))
    h, w = canvas.shape
    hb, wb = -(-h // f), -(-w // f)
    pad = np.full((hb * f, wb * f), 255, np.uint8)
    pad[:h, :w] = canvas.labels
    fr = np.stack([(pad == c).reshape(hb, f, wb, f).mean(axis=(1, 3)) for c in range(4)])
    bulk = tumour_bulk(fr[1].astype(np.float32), coarse_mpp=canvas.mpp * f,
                       radius_um=cfg.bulk_closing_radius_um)
    in_bulk = np.repeat(np.repeat(bulk, f, 0), f, 1)[:h, :w]
    lab, px = canvas.labels, (canvas.mpp * 1e-3) ** 2
    sb = (lab == 2) & in_bulk
    areas = {"tumour": (lab == 1).sum() * px, "stroma": (lab == 2).sum() * px,
             "other": (lab == 3).sum() * px, "stroma_in_bulk": sb.sum() * px,
             "bulk": (in_bulk & (lab > 0)).sum() * px,
             "nuclear_area_in_bulk_stroma_mm2": canvas.nuclei[sb].sum() / 255.0 * px}
    return fr.astype(np.float32), bulk, areas


@pytest.mark.parametrize("shape,coarse_mpp", [((301, 517), 8.0), ((448, 448), 8.0),
                                              ((1000, 37), 8.0), ((448, 448), 40.0)])
def test_region_summary_equals_per_pixel_reference(shape, coarse_mpp):
    """(40 µm coarse pixels: 400 canvas pixels per block, beyond a uint8 count.)"""
    cfg = ScoreConfig(coarse_mpp=coarse_mpp)
    canvas = _canvas(*shape)
    got = region_summary(canvas, cfg)
    fractions, bulk, areas = _reference(canvas, cfg)
    assert np.array_equal(got.fractions, fractions)
    assert np.array_equal(got.bulk, bulk)
    assert got.coarse_mpp == coarse_mpp
    for name, value in areas.items():
        assert getattr(got.areas, name) == pytest.approx(value, rel=1e-12, abs=1e-15), name
    if shape == (448, 448) and coarse_mpp == 8.0:  # a real bulk with stroma: bulk sums used
        assert got.areas.stroma_in_bulk > 0.1 * got.areas.stroma > 0
