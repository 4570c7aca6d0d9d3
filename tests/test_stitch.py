"""RegionCanvas: tile cores written in batches, in any order, land in the right place,
and the tissue mask decides tissue vs glass pixel by pixel (against a per-pixel
reference)."""

from __future__ import annotations

import numpy as np

from tilscore.engine.stitch import RegionCanvas
from tilscore.prepare.tiles import TileGrid, TileSpec
from tilscore.prepare.tissue import TissueMask


def _grid(n_cols: int, n_rows: int) -> TileGrid:
    spec = TileSpec(mpp=0.5, tile_px=96, overlap_px=16)  # core 64 px = 32 µm
    rows, cols = np.divmod(np.arange(n_cols * n_rows), n_cols)
    return TileGrid(spec, 0.25, (n_cols * 128, n_rows * 128), n_cols, n_rows,
                    cols.astype(np.int64), rows.astype(np.int64))


def _expected_inside(shape, canvas_mpp: float, mask: TissueMask) -> np.ndarray:
    """Reference, pixel by pixel: the mask value under each canvas pixel centre."""
    out = np.zeros(shape, bool)
    for i in range(shape[0]):
        for j in range(shape[1]):
            mi = int((i + 0.5) * canvas_mpp // mask.mpp)
            mj = int((j + 0.5) * canvas_mpp // mask.mpp)
            if mi < mask.mask.shape[0] and mj < mask.mask.shape[1]:
                out[i, j] = mask.mask[mi, mj]
    return out


def test_canvas_applies_the_tissue_mask_per_pixel(tmp_path):
    grid = _grid(3, 5)  # 5 tile rows: two bands (4 + 1)
    rng = np.random.default_rng(3)
    # 6 µm mask pixels do not align with 2 µm canvas pixels or 32 µm cores, and the mask
    # stops short of the grid (its last column and row are beyond it)
    mask = TissueMask(rng.random((25, 15)) > 0.4, 6.0)
    canvas = RegionCanvas(tmp_path / "c.zarr", grid, 4, mask)
    block = canvas.block
    regions = rng.integers(0, 4, (len(grid), block, block)).astype(np.uint8)
    nuclei = rng.random((len(grid), block, block)).astype(np.float32)
    order = rng.permutation(len(grid))
    for part in np.array_split(order, 4):  # batches of tiles in any order
        canvas.write(grid.cols[part], grid.rows[part], regions=regions[part],
                     nucleus_fraction=nuclei[part])
    canvas.flush()

    model = np.zeros(canvas.shape, np.uint8)
    cover = np.zeros(canvas.shape, np.uint8)
    for k, (c, r) in enumerate(zip(grid.cols, grid.rows, strict=True)):
        model[r * block:(r + 1) * block, c * block:(c + 1) * block] = regions[k]
        cover[r * block:(r + 1) * block, c * block:(c + 1) * block] = np.round(nuclei[k] * 255)
    inside = _expected_inside(canvas.shape, canvas.mpp, mask)
    assert inside.any() and (~inside).any()
    want = np.where(inside, np.where(model == 0, 3, model), 0)
    np.testing.assert_array_equal(np.asarray(canvas.labels[:]), want)
    np.testing.assert_array_equal(np.asarray(canvas.nuclei[:]), cover)
