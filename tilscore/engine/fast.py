"""The fast scoring mode (H&E): regions everywhere at a coarse mpp, lymphocytes only where
the stromal TIL score needs them.

Pass 1 runs the region model (``he-regions``: 2 µm/px, ~1 mm of context per tile) over
every tissue tile into the region canvas. From it come the tumour bulk and the stroma in
it (8 µm/px grids, the same maths as :mod:`tilscore.aggregate`). Pass 2 runs the cell
model (``he-default``, 0.5 µm/px) only on tiles whose core touches that bulk stroma,
dilated by the window a cell's compartment is read over; it yields the cells and the
lymphocyte-nucleus coverage, and its own region output is discarded, so the region map
comes from one model everywhere.

What the fast mode counts is exactly what the score counts (lymphocytes in the stroma of
the tumour bulk): counts in other compartments are not measured and are reported as null.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from tilscore.engine.defaults import DEFAULT_DECODE
from tilscore.engine.infer import SlidePrediction, predict_slide
from tilscore.prepare.tiles import TileSpec, select_tiles, tile_grid
from tilscore.prepare.tissue import TissueMask
from tilscore.scoring.aggregate import coarse_fractions
from tilscore.scoring.score import tumour_bulk

DEFAULT_REGION_MODEL = "he-regions"
# Bulk stroma is dilated by this before choosing cell tiles: a cell's compartment is the
# majority over a 24 µm window around it (aggregate.RegionSummary.compartment_at), so a
# cell up to ~12 µm (+ one coarse pixel) outside stroma pixels can still count as stromal.
CELL_MARGIN_UM = 16.0
COUNTED_COMPARTMENT = "stroma_in_tumour_bulk"


@dataclass
class FastPlan:
    """What the fast mode ran: ``region_tiles`` (pass 1), ``cell_grid`` (the pass-2
    tiles), ``full_cell_tiles`` (tiles the full mode would have run the cell model on),
    ``cell_area_mm2`` (the bulk stroma, dilated, that decided them)."""

    region_tiles: int
    cell_grid: object
    full_cell_tiles: int
    cell_area_mm2: float

    def as_dict(self, region_card) -> dict:
        return {
            "region_model": {"name": region_card.name, "version": region_card.version,
                             "sha256": region_card.sha256},
            "region_tiles": self.region_tiles,
            "cell_tiles": len(self.cell_grid),
            "cell_tiles_full_mode": self.full_cell_tiles,
            "cell_search_area_mm2": self.cell_area_mm2,
            "counted_compartments": [COUNTED_COMPARTMENT],
        }


def cell_search_mask(canvas, cfg):
    """:class:`~tilscore.tissue.TissueMask` (coarse mpp) of where lymphocytes can count
    towards the stromal TIL score: stroma dilated by CELL_MARGIN_UM, inside the bulk."""
    fractions, coarse_mpp = coarse_fractions(canvas, cfg)
    bulk = tumour_bulk(fractions[1], coarse_mpp=coarse_mpp, radius_um=cfg.bulk_closing_radius_um)
    r = max(1, math.ceil(CELL_MARGIN_UM / coarse_mpp))
    near_stroma = ndi.binary_dilation(fractions[2] > 0, structure=np.ones((2 * r + 1,) * 2))
    return TissueMask(near_stroma & bulk, coarse_mpp)


def predict_fast(slide, mask, *, regions, cells, work: Path, cfg, workers: int,
                 batch_size: int | None = None, progress=None, decode: str = DEFAULT_DECODE):
    """Both passes on an open `slide` with tissue mask `mask`: `regions` and `cells` are
    :class:`~tilscore.infer.Predictor` s of the region and cell models. Returns
    (SlidePrediction, FastPlan): the prediction's canvas is pass 1's regions with pass 2's
    nucleus coverage, its cells and focus are pass 2's (focus in ``plan.cell_grid``
    order); `decode` as in :func:`~tilscore.infer.predict_slide`."""
    def grid_for(card):
        return tile_grid(slide.dimensions, slide.mpp, spec=TileSpec.from_card(card), mask=mask)

    t0 = time.perf_counter()
    region_grid = grid_for(regions.card)
    first = predict_slide(slide, region_grid, predictor=regions, store_path=work / ".canvas.zarr",
                          workers=workers,
                          batch_size=batch_size, tissue=mask, progress=progress,
                          decode=decode)
    t1 = time.perf_counter()
    search = cell_search_mask(first.canvas, cfg)
    full_grid = grid_for(cells.card)
    cell_grid = select_tiles(full_grid, search)
    second = predict_slide(slide, cell_grid, predictor=cells, store_path=work / ".cells.zarr",
                           workers=workers,
                           batch_size=batch_size, tissue=mask, progress=progress,
                           decode=decode)
    first.canvas.copy_nuclei_from(second.canvas)
    shutil.rmtree(work / ".cells.zarr", ignore_errors=True)
    t2 = time.perf_counter()
    timings = {k: first.timings_s[k] + second.timings_s[k] for k in first.timings_s}
    timings.update(region_pass=t1 - t0, cell_pass=t2 - t1)
    pred = SlidePrediction(first.canvas, second.cells, first.tiles + second.tiles,
                           first.failed_tiles + second.failed_tiles, timings, second.focus,
                           first.region_uncertain_fraction)
    plan = FastPlan(len(region_grid), cell_grid, len(full_grid), search.area_mm2)
    return pred, plan


def covered(grid, points_xy_um: np.ndarray) -> np.ndarray:
    """bool (N,): whether each point (µm) lies in the core of a tile of `grid`."""
    core_um = grid.spec.core_px * grid.spec.mpp
    cols = np.floor(points_xy_um[:, 0] / core_um).astype(np.int64)
    rows = np.floor(points_xy_um[:, 1] / core_um).astype(np.int64)
    done = np.zeros((grid.n_rows, grid.n_cols), bool)
    done[grid.rows, grid.cols] = True
    inside = (rows >= 0) & (rows < grid.n_rows) & (cols >= 0) & (cols < grid.n_cols)
    out = np.zeros(len(points_xy_um), bool)
    out[inside] = done[rows[inside], cols[inside]]
    return out


def mask_unsearched(density: np.ndarray, grid, *, grid_um: float) -> np.ndarray:
    """The density map (per mm², `grid_um` cells) with NaN where the cell pass did not
    look (cell centres outside every pass-2 tile core): unmeasured, not zero."""
    rows, cols = density.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    centres = np.stack([(xx.ravel() + 0.5) * grid_um, (yy.ravel() + 0.5) * grid_um], axis=1)
    out = density.astype(np.float32, copy=True)
    out[~covered(grid, centres).reshape(rows, cols)] = np.nan
    return out
