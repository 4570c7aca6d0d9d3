"""Streaming reductions over the zarr region map: coarse tumour fraction, area sums.

The region map can be 10k x 10k+ pixels; it is read in row bands so memory stays
bounded, and only coarse (≈8 µm/px) arrays are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tilscore.score import RegionAreas, ScoreConfig, tumour_bulk

_BAND_CHUNKS = 2  # canvas chunk rows per band (a chunk row is 4 tile rows)


def _bands(canvas, factor: int):
    """Yield (row0, labels band, nuclei band); band heights are multiples of `factor`."""
    h = canvas.shape[0]
    step = max(factor, (canvas.chunk * _BAND_CHUNKS) // factor * factor)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        yield r0, canvas.labels[r0:r1], canvas.nuclei[r0:r1]


def _block_mean(mask: np.ndarray, factor: int, out_shape_cols: int) -> np.ndarray:
    """Mean of `mask` over factor x factor blocks (edge blocks padded with False)."""
    h, w = mask.shape
    ph, pw = (-h) % factor, out_shape_cols * factor - w
    m = np.pad(mask, ((0, ph), (0, max(0, pw))))
    return m.reshape(m.shape[0] // factor, factor, -1, factor).mean(axis=(1, 3))


def coarse_factor(canvas, cfg: ScoreConfig) -> int:
    return max(1, int(round(cfg.coarse_mpp / canvas.mpp)))


def coarse_fractions(canvas, cfg: ScoreConfig, n_classes: int = 4) -> tuple[np.ndarray, float]:
    """float32 (n_classes, H', W') fraction of each region code per coarse pixel, and the
    coarse mpp."""
    f = coarse_factor(canvas, cfg)
    cols = -(-canvas.shape[1] // f)
    bands = [np.stack([_block_mean(labels == c, f, cols).astype(np.float32)
                       for c in range(n_classes)]) for _, labels, _ in _bands(canvas, f)]
    return np.concatenate(bands, axis=1), canvas.mpp * f


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
                       window_um: float = 24.0) -> np.ndarray:
        """Region code (1 tumour, 2 stroma, 3 other; 0 outside tissue) of the
        neighbourhood of each point: class fractions averaged over `window_um`.

        A cell's own nucleus is not its compartment's evidence: the model segments the
        pixels under a lymphocyte nucleus as stroma-like even inside a tumour nest, so
        we look at the surrounding ~24 µm instead of the point itself.
        """
        from scipy import ndimage as ndi

        size = max(1, int(round(window_um / self.coarse_mpp)))
        smooth = ndi.uniform_filter(self.fractions, size=(1, size, size), mode="nearest")
        i = np.clip((y_um / self.coarse_mpp).astype(int), 0, smooth.shape[1] - 1)
        j = np.clip((x_um / self.coarse_mpp).astype(int), 0, smooth.shape[2] - 1)
        tissue_classes = smooth[1:, i, j]
        code = tissue_classes.argmax(axis=0).astype(np.uint8) + 1
        code[tissue_classes.sum(axis=0) < 1e-6] = 0
        return code


def region_summary(canvas, cfg: ScoreConfig) -> RegionSummary:
    """One streaming pass for coarse fractions, one for exact areas."""
    fractions, coarse_mpp = coarse_fractions(canvas, cfg)
    bulk = tumour_bulk(fractions[1], coarse_mpp, cfg.bulk_closing_radius_um)
    f = coarse_factor(canvas, cfg)
    px_mm2 = (canvas.mpp * 1e-3) ** 2
    sums = dict.fromkeys(("tumour", "stroma", "other", "stroma_bulk", "bulk", "nuclei"), 0.0)
    for r0, labels, nuclei in _bands(canvas, f):
        rows = slice(r0 // f, r0 // f + -(-labels.shape[0] // f))
        in_bulk = np.repeat(np.repeat(bulk[rows], f, 0), f, 1)[: labels.shape[0],
                                                              : labels.shape[1]]
        stroma = labels == 2
        sums["tumour"] += float((labels == 1).sum())
        sums["stroma"] += float(stroma.sum())
        sums["other"] += float((labels == 3).sum())
        sb = stroma & in_bulk
        sums["stroma_bulk"] += float(sb.sum())
        sums["bulk"] += float((in_bulk & (labels > 0)).sum())
        sums["nuclei"] += float(nuclei[sb].astype(np.float64).sum() / 255.0)
    areas = RegionAreas(
        tumour=sums["tumour"] * px_mm2, stroma=sums["stroma"] * px_mm2,
        other=sums["other"] * px_mm2, stroma_in_bulk=sums["stroma_bulk"] * px_mm2,
        bulk=sums["bulk"] * px_mm2, nuclear_area_in_bulk_stroma_mm2=sums["nuclei"] * px_mm2,
    )
    labels = fractions.argmax(axis=0).astype(np.uint8)
    return RegionSummary(areas, bulk, labels == 1, labels, coarse_mpp, fractions)
