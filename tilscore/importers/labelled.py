"""The in-memory labelled tile every importer produces and training consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Region codes shared by all sources (match the model card's region_classes order).
REGION_CODES = {"background": 0, "tumour": 1, "stroma": 2, "other": 3}
IGNORE = 255  # region unknown: no loss
# Cell class codes: index into the card's cell_classes; -1 = a nucleus with no class
# (detections on it are neither right nor wrong).
CELL_CODES = {"lymphocyte": 0, "other": 1}
UNCLASSIFIED = -1


@dataclass
class LabelledTile:
    """One labelled image.

    ``image``: uint8 (H, W, 3) RGB; ``mpp``: µm/px; ``region``: uint8 (H, W) codes of
    REGION_CODES with IGNORE where unknown, or None (no region labels at all);
    ``points_xy``: float64 (N, 2) nucleus centres in pixels (pixel centres at .5);
    ``point_cls``: int64 (N,) codes of CELL_CODES or UNCLASSIFIED; ``has_cells``: False
    when the source labels no cells (heatmap loss off); ``nucleus_mask``: optional uint8
    (H, W) lymphocyte-nucleus mask; ``source``: file it came from.
    """

    image: np.ndarray
    mpp: float
    region: np.ndarray | None
    points_xy: np.ndarray
    point_cls: np.ndarray
    has_cells: bool = True
    nucleus_mask: np.ndarray | None = None
    source: str = ""
    split: str | None = None  # "train"/"val" when the dataset defines it
