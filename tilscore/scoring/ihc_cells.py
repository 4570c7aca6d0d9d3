"""The IHC cell rule: H-DAB cell detection on model tiles, in the cell-table layout.

The compartment model segments regions on IHC like on H&E; cells come from
:func:`tilscore.ihc_detect.detect_cells` (nuclei found once for every marker, a lymphocyte
gate, DAB read where the marker lives) instead of the model's heatmaps. This adapts its
output to what the stitcher collects: float32 rows (tile_in_batch, class, x_px, y_px,
score, then :attr:`IhcCellRule.extra_columns`), class 0 = ``<marker>_positive`` and 1 =
``negative``, cells of the tile core only (so a cell on a core border is counted once, as
with heatmap peaks). A tile that reaches past the slide's edge is mirrored there before
detection (the reader pads it with white), so cells at the slide's edge are measured on
the same kind of context as cells inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tilscore.scoring.ihc_detect import detect_cells

INTENSITY_BINS = ("none", "weak", "moderate", "strong")  # QuPath-style DAB bins 0..3
# Per-cell measurements, in CellsOnTile attribute names (cells.csv columns, in order).
MEASUREMENTS = ("dab_od", "dab_background_od", "intensity_bin", "dab_nucleus_od",
                "dab_membrane_od", "haematoxylin_fraction", "nucleus_area_um2",
                "nucleus_axis_ratio", "gate")


@dataclass(frozen=True)
class IhcCellRule:
    """`marker`: "cd20" or "foxp3"; `mpp`: µm/px of the tiles; `stain`: the slide's
    :class:`~tilscore.ihc.StainVectors` (None: Ruifrok defaults); `params`:
    :class:`~tilscore.ihc_detect.IhcParams` (None: the marker's defaults);
    `extent_px`: (width, height) of the slide in tile pixels (None: unknown, no mirroring).
    """

    marker: str
    mpp: float
    stain: object = None
    params: object = None
    extent_px: tuple[float, float] | None = None
    extra_columns: tuple[str, ...] = MEASUREMENTS

    @property
    def class_names(self) -> tuple[str, str]:
        return (f"{self.marker}_positive", "negative")

    def valid_boxes(self, origins_px: np.ndarray, tile_px: int) -> torch.Tensor | None:
        """int64 (B, 4) (x0, y0, x1, y1) of each tile's part on the slide, in tile pixels;
        None when every tile lies wholly on the slide (or the extent is unknown)."""
        if self.extent_px is None or origins_px is None:
            return None
        o = np.asarray(origins_px, np.float64)
        w, h = self.extent_px
        x0, y0 = np.clip(-o[:, 0], 0, tile_px), np.clip(-o[:, 1], 0, tile_px)
        x1 = np.clip(np.floor(w - o[:, 0]), 0, tile_px)
        y1 = np.clip(np.floor(h - o[:, 1]), 0, tile_px)
        box = np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)
        if (box[:, :2] == 0).all() and (box[:, 2:] == tile_px).all():
            return None
        return torch.from_numpy(box)

    def __call__(self, images_nhwc: torch.Tensor, core: tuple[int, int],
                 origins_px: np.ndarray | None = None) -> torch.Tensor:
        """`images_nhwc`: uint8 (B, H, W, 3) on the device; `core`: (start, stop) px;
        `origins_px`: int (B, 2) tile top-left in tile (grid) px, for the slide's edge."""
        valid = self.valid_boxes(origins_px, images_nhwc.shape[2])
        rows = []
        for b, cells in enumerate(detect_cells(images_nhwc, self.mpp, marker=self.marker,
                                               params=self.params, stain_matrix=self.stain,
                                               valid_px=valid)):
            x, y = cells.x_px.float(), cells.y_px.float()
            keep = (x >= core[0]) & (x < core[1]) & (y >= core[0]) & (y < core[1])
            cols = [torch.full_like(x, float(b)), (~cells.positive).float(), x, y,
                    cells.score.float()]
            cols += [getattr(cells, name).float() for name in self.extra_columns]
            rows.append(torch.stack(cols, dim=1)[keep])
        if not rows:
            return torch.zeros((0, 5 + len(self.extra_columns)), device=images_nhwc.device)
        return torch.cat(rows)
