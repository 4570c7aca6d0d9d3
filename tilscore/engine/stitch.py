"""Stitching tile predictions into slide-level outputs.

Each tile contributes only its core (its overlap is context), so cores tile the grid
exactly: the region map has no seams and no cell is counted twice. The region map is a
zarr array on disk (chunks of 4 x 4 tile cores) written a band of tile rows at a time,
never a whole-slide array in RAM; cells accumulate as compact columns.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from tilscore.prepare.tiles import TileGrid

BAND_TILE_ROWS = 4  # tile rows per buffered band (the loader reads blocks of 4 x 4 tiles)
MAX_PENDING_BANDS = 2  # complete bands waiting for the background writer


class RegionCanvas:
    """Region labels (uint8) and lymphocyte-nucleus coverage (uint8, 0–255 = 0–100 %) at
    ``mpp`` = tile mpp × factor, in zarr arrays under `store_path`; ``block`` = one tile
    core in canvas pixels, ``chunk`` = the zarr chunk side (BAND_TILE_ROWS blocks).

    Pixel (i, j) covers grid px [j·f, (j+1)·f) × [i·f, (i+1)·f). Pixels never written
    (no tissue tile) read as 0 = background.
    """

    def __init__(self, store_path: str | Path, grid: TileGrid, factor: int, tissue=None):
        self.tissue = tissue  # TissueMask: decides tissue vs glass (see write)
        core = grid.spec.core_px
        self.factor = int(factor)
        self.block = core // self.factor
        self.chunk = BAND_TILE_ROWS * self.block  # one chunk row = one band: written once
        self.mpp = grid.spec.mpp * self.factor
        shape = (grid.n_rows * self.block, grid.n_cols * self.block)
        self.group = zarr.open_group(str(store_path), mode="w")
        kw = dict(shape=shape, chunks=(self.chunk, self.chunk), dtype="uint8", fill_value=0)
        self.labels = self.group.create_array("labels", **kw)
        self.nuclei = self.group.create_array("lymphocyte_nuclei", **kw)
        self.shape = shape
        bands, counts = np.unique(np.asarray(grid.rows) // BAND_TILE_ROWS, return_counts=True)
        self._band_tiles = dict(zip(bands.tolist(), counts.tolist(), strict=True))
        self._bands: dict[int, list] = {}
        # Complete bands are encoded and stored on one background thread (zarr's codecs
        # release the GIL), off the engine's critical path; flush() waits for them.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canvas")
        self._writes: list = []

    def write(self, cols: np.ndarray, rows: np.ndarray, *, regions: np.ndarray,
              nucleus_fraction: np.ndarray | None) -> None:
        """Write per-tile blocks: regions uint8 (B, block, block) for tiles (cols, rows).

        With a tissue mask, the tissue detector decides tissue vs glass and the model only
        subdivides tissue: model background inside the mask becomes 3 (other tissue:
        necrosis, fat, ...), model tissue outside the mask becomes 0.

        Blocks gather in a band of BAND_TILE_ROWS tile rows (bounded memory: one band is
        a few MB for any slide width), written to zarr in one call when every tile of the
        band has arrived: each zarr chunk is encoded and stored once, whole (a chunk per
        tile core cost a small file per tile: ~1-4 ms each, the engine's largest host cost).
        Call :meth:`flush` after the last tile (tiles that failed to decode never arrive).
        """
        c = self.block
        cols, rows = np.asarray(cols, np.int64), np.asarray(rows, np.int64)
        if self.tissue is not None:  # the whole batch at once (per tile: ~0.2 ms of numpy)
            inside = self._tissue_blocks(rows, cols)
            regions = np.where(inside, np.where(regions == 0, 3, regions), 0).astype(np.uint8)
        if nucleus_fraction is not None:
            nucleus_fraction = np.round(nucleus_fraction * 255).astype(np.uint8)
        for k, (col, row) in enumerate(zip(cols.tolist(), rows.tolist(), strict=True)):
            band = row // BAND_TILE_ROWS
            buf = self._bands.get(band)
            if buf is None:
                rows_px = min(BAND_TILE_ROWS * c, self.shape[0] - band * BAND_TILE_ROWS * c)
                buf = self._bands[band] = [np.zeros((rows_px, self.shape[1]), np.uint8),
                                           np.zeros((rows_px, self.shape[1]), np.uint8), 0]
            r0 = (row - band * BAND_TILE_ROWS) * c
            buf[0][r0 : r0 + c, col * c : (col + 1) * c] = regions[k]
            if nucleus_fraction is not None:
                buf[1][r0 : r0 + c, col * c : (col + 1) * c] = nucleus_fraction[k]
            buf[2] += 1
            if buf[2] == self._band_tiles.get(band, 0):
                self._write_band(band)

    def flush(self) -> None:
        """Write every band still buffered (those with tiles that never arrived) and wait
        until every band is stored (a write error is raised here). Call it once, last."""
        for band in sorted(self._bands):
            self._write_band(band)
        writes, self._writes = self._writes, []
        for fut in writes:
            fut.result()
        self.close()

    def close(self) -> None:
        """Wait for band writes in flight (their errors ignored: after a failure the
        caller discards the canvas) and stop the writer thread; safe to call again."""
        for fut in self._writes:
            fut.exception()
        self._writes = []
        self._writer.shutdown(wait=True)

    def _write_band(self, band: int) -> None:
        labels, nuclei, _ = self._bands.pop(band)
        r0 = band * self.chunk
        rows = slice(r0, r0 + labels.shape[0])
        pending = []
        for fut in self._writes:  # a failed write raises here, not later
            if fut.done():
                fut.result()
            else:
                pending.append(fut)
        while len(pending) >= MAX_PENDING_BANDS:  # bounded memory if storage is slow
            pending.pop(0).result()
        self._writes = [*pending, self._writer.submit(self._store, rows, labels, nuclei)]

    def _store(self, rows: slice, labels: np.ndarray, nuclei: np.ndarray) -> None:
        self.labels[rows] = labels
        self.nuclei[rows] = nuclei

    def copy_nuclei_from(self, other: RegionCanvas) -> None:
        """Take the lymphocyte-nucleus coverage of `other` (same mpp and origin; e.g. the
        cell pass of the fast mode onto its region canvas), a band of rows at a time."""
        if abs(other.mpp - self.mpp) > 1e-9:
            raise ValueError(f"canvas mpp differ: {other.mpp} vs {self.mpp}")
        h, w = min(self.shape[0], other.shape[0]), min(self.shape[1], other.shape[1])
        for r0 in range(0, h, self.chunk):
            r1 = min(h, r0 + self.chunk)
            self.nuclei[r0:r1, :w] = other.nuclei[r0:r1, :w]

    def labels_within(self, extent_um: tuple[float, float]) -> CroppedRows:
        """The labels cropped to the slide's extent (w, h) in µm (the last cores reach
        past the slide edge), read lazily in row bands."""
        h = min(self.shape[0], int(np.ceil(extent_um[1] / self.mpp)))
        w = min(self.shape[1], int(np.ceil(extent_um[0] / self.mpp)))
        return CroppedRows(self.labels, h, w)

    def _tissue_blocks(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """bool (B, block, block): tissue-mask value at each canvas pixel centre of the
        blocks of tiles (rows, cols); False beyond the mask."""
        m = self.tissue
        c = self.block
        centres_um = (np.arange(c) + 0.5) * self.mpp
        i = ((rows[:, None] * c * self.mpp + centres_um) / m.mpp).astype(np.int64)  # (B, c)
        j = ((cols[:, None] * c * self.mpp + centres_um) / m.mpp).astype(np.int64)
        valid = (i < m.mask.shape[0])[:, :, None] & (j < m.mask.shape[1])[:, None, :]
        i = np.minimum(i, m.mask.shape[0] - 1)
        j = np.minimum(j, m.mask.shape[1] - 1)
        return m.mask[i[:, :, None], j[:, None, :]] & valid


class CroppedRows:
    """The top-left (h, w) of a 2-D array, read by row slices (``view[r0:r1]``): what
    :func:`tilscore.io.ome_zarr.write_ome_zarr` reads, without loading the array."""

    def __init__(self, array, h: int, w: int):
        self.array, self.shape, self.dtype = array, (int(h), int(w)), array.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        return np.asarray(self.array[start:stop, : self.shape[1]])


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
