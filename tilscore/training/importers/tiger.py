"""TIGER challenge "wsirois" ROI crops (breast cancer, ~0.5 µm/px).

Layout: ``images/<name>.png`` RGB ROI crops, ``masks/<name>.png`` uint8 (H, W) TIGER
tissue codes, and optionally ``tiger-coco.json`` (COCO) with lymphocyte and plasma-cell
bounding boxes: ``{"images": [{"id", "file_name", "width", "height"}], "annotations":
[{"image_id", "bbox": [x, y, w, h], "category_id"}], "categories": [{"id", "name"}]}``.

Regions: 1 invasive tumour, 3 in-situ tumour → tumour; 2 tumour-associated stroma,
6 inflamed stroma → stroma; 4 healthy glands, 5 necrosis, 7 rest → other; 0 unannotated →
IGNORE. Cells: box centre ``(x + w/2, y + h/2)``, COCO's continuous coordinates (pixel
edges at integers, so already the LabelledTile pixel-centre-at-.5 convention); categories
named like lymphocytes or plasma cells → lymphocyte, others → UNCLASSIFIED (warned).

TIGER annotates only lymphocytes and plasma cells: other nuclei carry no label, so a tile
has ``has_cells=True`` with lymphocyte points only, and a detection of class "other" is
unverifiable on these tiles (training must not count it as a false positive). Images that
``tiger-coco.json`` does not list, or all images when it is absent, get ``has_cells=False``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tilscore.errors import InputError
from tilscore.training.importers.bcss import load_mask_tiles
from tilscore.training.importers.labelled import (
    CELL_CODES,
    IGNORE,
    REGION_CODES,
    UNCLASSIFIED,
    LabelledTile,
)
from tilscore.training.importers.native import (
    LoadStats,
    begin,
    clean_points,
    read_json,
    require_tiles,
)

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.5
COCO_NAME = "tiger-coco.json"
_TUMOUR, _STROMA, _OTHER = REGION_CODES["tumour"], REGION_CODES["stroma"], REGION_CODES["other"]
TIGER_LUT = {0: IGNORE, 1: _TUMOUR, 2: _STROMA, 3: _TUMOUR, 4: _OTHER, 5: _OTHER, 6: _STROMA,
             7: _OTHER}


def _category_code(name: str, source: Path, stats: LoadStats) -> int:
    low = str(name).lower()
    if "lymph" in low or "plasma" in low:
        return CELL_CODES["lymphocyte"]
    stats.unknown(str(name), str(source))
    return UNCLASSIFIED


def read_coco(path: Path, stats: LoadStats) -> dict[str, tuple[tuple, np.ndarray, np.ndarray]]:
    """File name (no folders) → ((width, height), float64 (N, 2) centres, int64 (N,) codes)."""
    data = read_json(path)
    try:
        codes = {c["id"]: _category_code(c["name"], path, stats) for c in data["categories"]}
        by_id = {im["id"]: (Path(im["file_name"]).name, (im.get("width"), im.get("height")))
                 for im in data["images"]}
        cells = {i: ([], []) for i in by_id}
        for ann in data.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            cells[ann["image_id"]][0].append((x + w / 2, y + h / 2))
            cells[ann["image_id"]][1].append(codes[ann["category_id"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a COCO file with images, annotations, categories "
                         f"(problem at {exc!r})") from exc
    return {name: (size, np.asarray(cells[i][0], np.float64).reshape(-1, 2),
                   np.asarray(cells[i][1], np.int64)) for i, (name, size) in by_id.items()}


def load_tiger(folder: Path, mpp: float | None = None, *, stats: LoadStats | None = None
               ) -> list[LabelledTile]:
    """Tiles with TIGER regions and (where ``tiger-coco.json`` lists them) lymphocytes."""
    folder, stats = begin(folder, mpp, stats=stats)
    tiles = load_mask_tiles(folder, TIGER_LUT, default_mpp=DEFAULT_MPP, mpp=mpp, stats=stats)
    coco_path = folder / COCO_NAME
    cells = read_coco(coco_path, stats) if coco_path.exists() else {}
    unlisted = 0
    for tile in tiles:
        name = Path(tile.source).name
        if name not in cells:
            unlisted += 1
            continue
        (width, height), xy, cls = cells[name]
        if (width, height) not in ((None, None), (tile.image.shape[1], tile.image.shape[0])):
            raise InputError(f"{coco_path}: {name} listed as {width}x{height} px but the image "
                             f"is {tile.image.shape[1]}x{tile.image.shape[0]} px")
        tile.points_xy, tile.point_cls = clean_points(xy, cls, shape_hw=tile.image.shape[:2],
                                                      source=coco_path,
                                                      stats=stats)
        tile.has_cells = True
    if cells and unlisted:
        log.warning("%s: %d images not listed there have no cell labels", coco_path, unlisted)
    return require_tiles(tiles, folder, stats=stats)
