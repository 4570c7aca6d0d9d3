"""Stitching tile predictions into slide-level outputs.

Each tile contributes only its core (its overlap is context), so cores tile the grid
exactly: the region map has no seams and no cell is counted twice. The region map is a
zarr array on disk written one core-sized chunk at a time, never a whole-slide array
in RAM; cells accumulate as compact columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilscore.tiles import TileGrid


class RegionCanvas:
    """Region labels (uint8) and lymphocyte-nucleus coverage (uint8, 0–255 = 0–100 %) at
    ``mpp`` = tile mpp × factor, in zarr arrays under `store_path` (chunk = one tile core).

    Pixel (i, j) covers grid px [j·f, (j+1)·f) × [i·f, (i+1)·f). Pixels never written
    (no tissue tile) read as 0 = background.
    """

    def __init__(self, store_path: str | Path, grid: TileGrid, factor: int, tissue=None):
        import zarr

        self.tissue = tissue  # TissueMask: decides tissue vs glass (see write)
        core = grid.spec.core_px
        self.factor = int(factor)
        self.chunk = core // self.factor
        self.mpp = grid.spec.mpp * self.factor
        shape = (grid.n_rows * self.chunk, grid.n_cols * self.chunk)
        self.group = zarr.open_group(str(store_path), mode="w")
        kw = dict(shape=shape, chunks=(self.chunk, self.chunk), dtype="uint8", fill_value=0)
        self.labels = self.group.create_array("labels", **kw)
        self.nuclei = self.group.create_array("lymphocyte_nuclei", **kw)
        self.shape = shape

    def write(self, cols: np.ndarray, rows: np.ndarray, regions: np.ndarray,
              nucleus_fraction: np.ndarray | None) -> None:
        """Write per-tile blocks: regions uint8 (B, chunk, chunk) for tiles (cols, rows).

        With a tissue mask, the tissue detector decides tissue vs glass and the model only
        subdivides tissue: model background inside the mask becomes 3 (other tissue:
        necrosis, fat, ...), model tissue outside the mask becomes 0.
        """
        c = self.chunk
        for k, (col, row) in enumerate(zip(cols, rows, strict=True)):
            sl = (slice(row * c, (row + 1) * c), slice(col * c, (col + 1) * c))
            block = regions[k]
            if self.tissue is not None:
                inside = self._tissue_block(row, col)
                block = np.where(inside, np.where(block == 0, 3, block), 0).astype(np.uint8)
            self.labels[sl] = block
            if nucleus_fraction is not None:
                self.nuclei[sl] = np.round(nucleus_fraction[k] * 255).astype(np.uint8)


    def _tissue_block(self, row: int, col: int) -> np.ndarray:
        """bool (chunk, chunk): tissue-mask value at each canvas pixel centre of a block."""
        m = self.tissue
        c = self.chunk
        centres_um = (np.arange(c) + 0.5) * self.mpp
        i = ((row * c * self.mpp + centres_um) / m.mpp).astype(np.int64)
        j = ((col * c * self.mpp + centres_um) / m.mpp).astype(np.int64)
        valid_i, valid_j = i < m.mask.shape[0], j < m.mask.shape[1]
        out = np.zeros((c, c), bool)
        out[np.ix_(valid_i, valid_j)] = m.mask[np.ix_(i[valid_i], j[valid_j])]
        return out


@dataclass
class CellCollector:
    """Accumulates detected cells as level-0 coordinates (float64 px), class index, score,
    and any `extra` per-cell measurements (e.g. DAB optical density on IHC)."""

    downsample: float
    extra: tuple[str, ...] = ()
    _parts: list = field(default_factory=list)

    def add(self, origins_px: np.ndarray, cells: np.ndarray) -> None:
        """`origins_px`: int (B, 2) tile top-left in grid px; `cells`: (N, 5 + len(extra))
        rows of (tile_in_batch, class, x_px, y_px, score, *extra) in tile pixels."""
        if len(cells) == 0:
            return
        tile = cells[:, 0].astype(np.int64)
        part = {"x_px": (origins_px[tile, 0] + cells[:, 2]) * self.downsample,
                "y_px": (origins_px[tile, 1] + cells[:, 3]) * self.downsample,
                "cls": cells[:, 1].astype(np.int16), "score": cells[:, 4].astype(np.float32)}
        for k, name in enumerate(self.extra):
            part[name] = cells[:, 5 + k].astype(np.float32)
        self._parts.append(part)

    def table(self) -> dict[str, np.ndarray]:
        """Columns ``x_px``, ``y_px`` (float64 level-0 px), ``cls`` (int16), ``score``
        (float32), then each extra column (float32)."""
        dtypes = {"x_px": np.float64, "y_px": np.float64, "cls": np.int16, "score": np.float32,
                  **{name: np.float32 for name in self.extra}}
        if not self._parts:
            return {k: np.zeros(0, t) for k, t in dtypes.items()}
        return {k: np.concatenate([p[k] for p in self._parts]) for k in dtypes}
