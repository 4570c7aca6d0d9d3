"""BCSS (Amgad et al., Bioinformatics 2019) tissue-region masks, breast cancer.

Layout: ``images/<name>.png`` (or ``rgbs_colorNormalized/`` as released) and
``masks/<name>.png``: uint8 (H, W) BCSS ground-truth codes, same size as the image.
No cells are labelled (``has_cells=False``). Pixel size: the `mpp` argument, else
``_MPP-<value>`` in the file name (as the release names them), else 0.25 µm/px.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from tilscore.errors import InputError
from tilscore.training.importers.labelled import IGNORE, REGION_CODES, LabelledTile
from tilscore.training.importers.native import (
    LoadStats,
    begin,
    list_images,
    read_mask,
    read_rgb,
    require_tiles,
    resolve_mpp,
)

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.25
IMAGE_DIRS = ("images", "rgbs_colorNormalized", "rgbs")
_TUMOUR, _STROMA, _OTHER = REGION_CODES["tumour"], REGION_CODES["stroma"], REGION_CODES["other"]
# BCSS code → region code. Lymphocytic infiltrate, plasma cells and other immune infiltrate
# lie in stroma (the TIL guideline scores them there); angioinvasion and DCIS are tumour.
BCSS_LUT = {
    0: IGNORE,  # outside_roi
    1: _TUMOUR,  # tumor
    2: _STROMA,  # stroma
    3: _STROMA,  # lymphocytic_infiltrate
    4: _OTHER,  # necrosis_or_debris
    5: _OTHER,  # glandular_secretions
    6: _OTHER,  # blood
    7: IGNORE,  # exclude
    8: _OTHER,  # metaplasia_NOS
    9: _OTHER,  # fat
    10: _STROMA,  # plasma_cells
    11: _STROMA,  # other_immune_infiltrate
    12: _OTHER,  # mucoid_material
    13: _OTHER,  # normal_acinus_or_duct
    14: _OTHER,  # lymphatics
    15: IGNORE,  # undetermined
    16: _OTHER,  # nerve
    17: _OTHER,  # skin_adnexa
    18: _OTHER,  # blood_vessel
    19: _TUMOUR,  # angioinvasion
    20: _TUMOUR,  # dcis
    21: _OTHER,  # other
}
_MPP_IN_NAME = re.compile(r"_MPP-(\d+(?:\.\d+)?)", re.IGNORECASE)


def map_codes(mask: np.ndarray, lut: dict[int, int], *, source: Path) -> np.ndarray:
    """uint8 (H, W) region codes from raw codes via `lut`; unknown codes → IGNORE (warned)."""
    table = np.full(max(256, int(mask.max(initial=0)) + 1), IGNORE, np.uint8)
    for raw, code in lut.items():
        table[raw] = code
    unknown = set(np.unique(mask).tolist()) - set(lut)
    if unknown:
        log.warning("%s: unknown label codes %s set to ignore", source, sorted(unknown))
    return table[np.clip(mask, 0, None)]


def image_dir(folder: Path) -> Path | None:
    """The first of IMAGE_DIRS under `folder` that exists, else None."""
    return next((folder / d for d in IMAGE_DIRS if (folder / d).is_dir()), None)


def load_mask_tiles(folder: Path, lut: dict[int, int], *, default_mpp: float, mpp: float | None,
                    stats: LoadStats) -> list[LabelledTile]:
    """Image + same-stem ``masks/<stem>.png`` pairs, regions mapped by `lut`, no cells."""
    tiles = []
    images = image_dir(folder)
    for path in list_images(images) if images else []:
        mask_path = folder / "masks" / f"{path.stem}.png"
        if not mask_path.exists():
            raise InputError(f"{path}: no region mask; expected {mask_path}")
        image = read_rgb(path, stats)
        if image is None:
            continue
        region = map_codes(read_mask(mask_path, image.shape[:2]), lut, source=mask_path)
        found = _MPP_IN_NAME.search(path.stem)
        tiles.append(LabelledTile(
            image=image,
            mpp=resolve_mpp(mpp, float(found.group(1)) if found else None, default_mpp,
                            source=str(path)),
            region=region, points_xy=np.zeros((0, 2)), point_cls=np.zeros(0, np.int64),
            has_cells=False, source=str(path),
        ))
    return tiles


def load_bcss(folder: Path, mpp: float | None = None, *, stats: LoadStats | None = None
              ) -> list[LabelledTile]:
    """Region-only tiles: tumour (1, 19, 20), stroma (2, 3, 10, 11), IGNORE (0, 7, 15),
    other (all remaining codes); see BCSS_LUT. Codes not in BCSS → IGNORE (warned)."""
    folder, stats = begin(folder, mpp, stats=stats)
    return require_tiles(load_mask_tiles(folder, BCSS_LUT, default_mpp=DEFAULT_MPP, mpp=mpp,
                                         stats=stats), folder, stats=stats)
