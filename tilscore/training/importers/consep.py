"""CoNSeP (Graham et al., HoVer-Net, Medical Image Analysis 2019): every nucleus outlined
and typed.

Layout: ``images/NAME.png`` (H&E, ~0.244 µm/px), ``masks/NAME.png`` (16-bit nucleus
instance map, 0 = no nucleus) and ``points/NAME.json`` = ``{"mpp": 0.2441, "points":
{"inflammatory": [[x, y], ...], "epithelial": ..., "spindle": ..., "other": ...,
"all_nuclei": ...}}`` with instance centroids in 0-based pixel-index coordinates (as
CRCHistoPhenotypes: tile coordinates are ``x + 0.5, y + 0.5``).

Classes: inflammatory → lymphocyte, epithelial → tumour, spindle → stromal, other →
other. Weak regions as CRCHistoPhenotypes (epithelial nuclei mark tumour epithelium;
spindle and inflammatory nuclei mark stroma; :func:`tilscore.importers.crchp.weak_regions`).
The lymphocyte-nucleus target is the union of the inflammatory nuclei's outlines.

Split: the folder holds the authors' 27 *train* images only, so a validation split is
held out by image: every image whose number is a multiple of 5 (5, 10, 15, 20, 25: 5 of
27 images, chosen by name before any model was trained, not by content).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from tilscore.errors import InputError
from tilscore.training.importers.crchp import typed_point_tiles
from tilscore.training.importers.labelled import CELL_CODES, LabelledTile
from tilscore.training.importers.native import LoadStats, begin, read_mask, require_tiles

DEFAULT_MPP = 0.2441
CLASS_LISTS = {
    "inflammatory": CELL_CODES["lymphocyte"],
    "epithelial": CELL_CODES["tumour"],
    "spindle": CELL_CODES["stromal"],
    "other": CELL_CODES["other"],
}
TUMOUR_LISTS, STROMA_LISTS = ("epithelial",), ("spindle", "inflammatory")
VAL_EVERY = 5  # image numbers divisible by this are the validation split
MATCH_PX = 1.5  # an instance whose centroid is this close to a point carries its class


def consep_split(name: str) -> str:
    """"val" for the held-out images (number divisible by VAL_EVERY), else "train"."""
    numbers = re.findall(r"\d+", name)
    return "val" if numbers and int(numbers[-1]) % VAL_EVERY == 0 else "train"


def lymphocyte_nuclei(instances: np.ndarray, lymph_xy: np.ndarray) -> np.ndarray:
    """uint8 (H, W): 1 on the instances whose centroid lies within MATCH_PX of a
    lymphocyte point. `instances`: int (H, W) instance ids (0 = none); `lymph_xy`: float
    (N, 2) centres in tile pixels (pixel centres at .5)."""
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if len(ids) == 0 or len(lymph_xy) == 0:
        return np.zeros(instances.shape, np.uint8)
    rc = np.asarray(ndimage.center_of_mass(np.ones_like(instances), instances, ids))
    centres = rc[:, ::-1] + 0.5  # (x, y), pixel centres at .5
    dist, _ = cKDTree(lymph_xy).query(centres, k=1)
    return np.isin(instances, ids[dist <= MATCH_PX]).astype(np.uint8)


def load_consep(folder: Path, mpp: float | None = None, *, stats: LoadStats | None = None
                ) -> list[LabelledTile]:
    """Tiles with typed points, weak regions and lymphocyte-nucleus masks (module doc)."""
    folder, stats = begin(folder, mpp, stats=stats)
    tiles = []
    for path, _, tile in typed_point_tiles(folder, mpp, default_mpp=DEFAULT_MPP,
                                           class_lists=CLASS_LISTS,
                                           tumour_lists=TUMOUR_LISTS, stroma_lists=STROMA_LISTS,
                                           stats=stats):
        mask_path = folder / "masks" / f"{path.stem}.png"
        if not mask_path.exists():
            raise InputError(f"{path}: no instance mask; expected {mask_path}")
        instances = read_mask(mask_path, tile.image.shape[:2])
        tile.nucleus_mask = lymphocyte_nuclei(
            instances, tile.points_xy[tile.point_cls == CELL_CODES["lymphocyte"]])
        tile.split = consep_split(path.stem)
        tiles.append(tile)
    return require_tiles(tiles, folder, stats=stats)
