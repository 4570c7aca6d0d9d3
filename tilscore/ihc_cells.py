"""The IHC cell rule: H-DAB cell detection on model tiles, in the cell-table layout.

The compartment model segments regions on IHC like on H&E; cells come from
:func:`tilscore.ihc_detect.detect_cells` (nuclei scored for DAB where the marker lives)
instead of the model's heatmaps. This adapts its output to what the stitcher collects:
float32 rows (tile_in_batch, class, x_px, y_px, score, dab_od, dab_background_od,
intensity_bin), class 0 = ``<marker>_positive`` and 1 = ``negative``, cells of the tile
core only (so a cell on a core border is counted once, as with heatmap peaks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INTENSITY_BINS = ("none", "weak", "moderate", "strong")  # QuPath-style DAB bins 0..3


@dataclass(frozen=True)
class IhcCellRule:
    """`marker`: "cd20" or "foxp3"; `mpp`: µm/px of the tiles; `stain`: the slide's
    :class:`~tilscore.ihc.StainVectors` (None: Ruifrok defaults); `params`:
    :class:`~tilscore.ihc_detect.IhcParams` (None: the marker's defaults)."""

    marker: str
    mpp: float
    stain: object = None
    params: object = None
    extra_columns: tuple[str, ...] = ("dab_od", "dab_background_od", "intensity_bin")

    @property
    def class_names(self) -> tuple[str, str]:
        return (f"{self.marker}_positive", "negative")

    def __call__(self, images_nhwc: torch.Tensor, core: tuple[int, int]) -> torch.Tensor:
        """`images_nhwc`: uint8 (B, H, W, 3) on the device; `core`: (start, stop) px."""
        from tilscore.ihc_detect import detect_cells

        rows = []
        for b, cells in enumerate(detect_cells(images_nhwc, self.mpp, self.marker,
                                               self.params, self.stain)):
            x, y = cells.x_px.float(), cells.y_px.float()
            keep = (x >= core[0]) & (x < core[1]) & (y >= core[0]) & (y < core[1])
            cols = [torch.full_like(x, float(b)), (~cells.positive).float(), x, y,
                    cells.score.float(), cells.dab_od.float(),
                    cells.dab_background_od.float(), cells.intensity_bin.float()]
            rows.append(torch.stack(cols, dim=1)[keep])
        if not rows:
            return torch.zeros((0, 5 + len(self.extra_columns)), device=images_nhwc.device)
        return torch.cat(rows)
