"""The in-memory labelled tile every importer produces and training consumes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Region codes shared by all sources (match the model card's region_classes order).
REGION_CODES = {"background": 0, "tumour": 1, "stroma": 2, "other": 3}
IGNORE = 255  # region unknown: no loss
# Cell class codes of labelled points (every importer maps its source classes onto these;
# the table is in docs/data-formats.md); -1 = a nucleus with no class (detections on it
# are neither right nor wrong). A model card may have fewer classes: `card_cell_index`
# maps a code to the card's class index (a class the card lacks counts as "other").
CELL_CODES = {"lymphocyte": 0, "other": 1, "tumour": 2, "stromal": 3}
UNCLASSIFIED = -1


def card_cell_index(point_cls: np.ndarray, cell_classes) -> np.ndarray:
    """int64 (N,): the index in `cell_classes` (a model card's) of each CELL_CODES code in
    `point_cls`; codes of classes the card lacks go to its "other" class (UNCLASSIFIED
    when it has none); UNCLASSIFIED stays UNCLASSIFIED."""
    classes = list(cell_classes)
    fallback = classes.index("other") if "other" in classes else UNCLASSIFIED
    lut = np.array([classes.index(name) if name in classes else fallback
                    for name in CELL_CODES], np.int64)
    point_cls = np.asarray(point_cls, np.int64)
    return np.where(point_cls >= 0, lut[np.clip(point_cls, 0, None)], UNCLASSIFIED)


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
