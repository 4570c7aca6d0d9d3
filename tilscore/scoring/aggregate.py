"""Streaming reductions over the zarr region map: coarse tumour fraction, area sums.

The region map can be 10k x 10k+ pixels; it is read in row bands so memory stays
bounded, and only coarse (≈8 µm/px) arrays are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from tilscore.scoring.score import RegionAreas, ScoreConfig, tumour_bulk

_BAND_CHUNKS = 2  # canvas chunk rows per band (a chunk row is 4 tile rows)
STROMA = 2  # region code (score.COMPARTMENT_OF_REGION)


def _bands(canvas, factor: int):
    """Yield (row0, labels band, nuclei band); band heights are multiples of `factor`."""
    h = canvas.shape[0]
    step = max(factor, (canvas.chunk * _BAND_CHUNKS) // factor * factor)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        yield r0, canvas.labels[r0:r1], canvas.nuclei[r0:r1]


def _block_stats(labels: np.ndarray, nuclei: np.ndarray, factor: int, cols: int,
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per `factor` x `factor` block of a band (edge blocks padded with pixels of no
    class): integer (n_classes, H', cols) count of each region code, and int64 (H', cols)
    sum of the nuclei values (0-255 coverage) over its stroma pixels."""
    h, w = labels.shape
    pad = ((0, (-h) % factor), (0, cols * factor - w))
    hb = (h + pad[0][1]) // factor

    def blocks(a: np.ndarray) -> np.ndarray:  # (H', cols, factor²): one row per block
        return a.reshape(hb, factor, cols, factor).transpose(0, 2, 1, 3).reshape(hb, cols, -1)

    lab = blocks(np.pad(labels, pad, constant_values=255))
    acc = np.uint8 if factor * factor < 256 else np.int32  # (narrow sums are ~2x faster)
    counts = np.stack([(lab == c).sum(axis=2, dtype=acc) for c in range(n_classes)])
    nuc = np.where(lab == STROMA, blocks(np.pad(nuclei, pad)), 0).sum(axis=2, dtype=np.int64)
    return counts, nuc


def coarse_factor(canvas, cfg: ScoreConfig) -> int:
    return max(1, int(round(cfg.coarse_mpp / canvas.mpp)))


def coarse_stats(canvas, cfg: ScoreConfig, *, n_classes: int = 4):
    """One streaming pass over the canvas: :func:`_block_stats` of the whole map at the
    coarse mpp (counts, nuclei sums), the factor from canvas to coarse pixels and the
    coarse mpp."""
    f = coarse_factor(canvas, cfg)
    cols = -(-canvas.shape[1] // f)
    stats = [_block_stats(labels, nuclei, f, cols, n_classes)
             for _, labels, nuclei in _bands(canvas, f)]
    counts = np.concatenate([c for c, _ in stats], axis=1)
    nuclei = np.concatenate([n for _, n in stats], axis=0)
    return counts, nuclei, f, canvas.mpp * f


def coarse_fractions(canvas, cfg: ScoreConfig, *, n_classes: int = 4) -> tuple[np.ndarray, float]:
    """float32 (n_classes, H', W') fraction of each region code per coarse pixel, and the
    coarse mpp."""
    counts, _, f, coarse_mpp = coarse_stats(canvas, cfg, n_classes=n_classes)
    return (counts / (f * f)).astype(np.float32), coarse_mpp


@dataclass
class RegionSummary:
    """``areas`` (mm²); coarse (``coarse_mpp``) bool grids ``bulk`` and ``tumour``, and
    ``labels`` uint8 (majority region code per coarse pixel); ``fractions`` float32
    (4, H', W') region-code fractions per coarse pixel."""

    areas: RegionAreas
    bulk: np.ndarray
    tumour: np.ndarray
    labels: np.ndarray
    coarse_mpp: float
    fractions: np.ndarray

    def compartment_at(self, x_um: np.ndarray, y_um: np.ndarray,
                       *, window_um: float = 24.0) -> np.ndarray:
        """Region code (1 tumour, 2 stroma, 3 other; 0 outside tissue) of the
        neighbourhood of each point: class fractions averaged over `window_um`.

        A cell's own nucleus is not its compartment's evidence: the model segments the
        pixels under a lymphocyte nucleus as stroma-like even inside a tumour nest, so
        we look at the surrounding ~24 µm instead of the point itself.
        """
        size = max(1, int(round(window_um / self.coarse_mpp)))
        smooth = ndi.uniform_filter(self.fractions, size=(1, size, size), mode="nearest")
        i = np.clip((y_um / self.coarse_mpp).astype(int), 0, smooth.shape[1] - 1)
        j = np.clip((x_um / self.coarse_mpp).astype(int), 0, smooth.shape[2] - 1)
        tissue_classes = smooth[1:, i, j]
        code = tissue_classes.argmax(axis=0).astype(np.uint8) + 1
        code[tissue_classes.sum(axis=0) < 1e-6] = 0
        return code


def region_summary(canvas, cfg: ScoreConfig) -> RegionSummary:
    """Coarse fractions, the tumour bulk and exact areas from one streaming pass: the
    bulk is constant over each coarse block, so the areas inside it are sums of the
    blocks' pixel counts."""
    counts, nuclei, f, coarse_mpp = coarse_stats(canvas, cfg)
    fractions = (counts / (f * f)).astype(np.float32)
    bulk = tumour_bulk(fractions[1], coarse_mpp=coarse_mpp, radius_um=cfg.bulk_closing_radius_um)
    px_mm2 = (canvas.mpp * 1e-3) ** 2
    n = counts.astype(np.int64)
    areas = RegionAreas(
        tumour=float(n[1].sum()) * px_mm2, stroma=float(n[STROMA].sum()) * px_mm2,
        other=float(n[3].sum()) * px_mm2,
        stroma_in_bulk=float(n[STROMA][bulk].sum()) * px_mm2,
        bulk=float(n[1:, bulk].sum()) * px_mm2,
        nuclear_area_in_bulk_stroma_mm2=float(nuclei[bulk].sum()) / 255.0 * px_mm2,
    )
    labels = fractions.argmax(axis=0).astype(np.uint8)
    return RegionSummary(areas, bulk, labels == 1, labels, coarse_mpp, fractions)


def tissue_area_grid(labels, mpp: float, *, grid_um: float, extent_um: tuple[float, float],
                     band_rows: int = 2048) -> np.ndarray:
    """float64 (rows, cols) mm² of tissue (region code > 0) in each cell of a `grid_um`
    grid covering `extent_um` (w, h) µm: rows = ⌈h / grid_um⌉, cols = ⌈w / grid_um⌉.

    `labels`: 2-D region codes at `mpp` µm/px (a zarr array or
    :class:`~tilscore.stitch.CroppedRows`, read `band_rows` rows at a time); a pixel counts
    in the grid cell holding its centre (clipped onto the grid), with its whole area, as
    the summary's areas count it."""
    cols = max(1, int(np.ceil(extent_um[0] / grid_um)))
    rows = max(1, int(np.ceil(extent_um[1] / grid_um)))
    h, w = labels.shape
    col_of = np.minimum(((np.arange(w) + 0.5) * mpp // grid_um).astype(np.int64), cols - 1)
    row_of = np.minimum(((np.arange(h) + 0.5) * mpp // grid_um).astype(np.int64), rows - 1)
    used_cols, first_px = np.unique(col_of, return_index=True)  # col_of is non-decreasing
    out = np.zeros((rows, cols), np.int64)
    for r0 in range(0, h, band_rows):
        tissue = np.asarray(labels[r0:r0 + band_rows]) > 0
        if tissue.size == 0:
            continue
        per_row = np.add.reduceat(tissue, first_px, axis=1, dtype=np.int64)
        band = np.zeros((rows, len(used_cols)), np.int64)
        np.add.at(band, row_of[r0:r0 + len(tissue)], per_row)
        out[:, used_cols] += band
    return out * (mpp * 1e-3) ** 2
