"""NuCLS (Amgad et al., GigaScience 2022) nucleus boxes, breast cancer, 0.2 µm/px.

Layout: ``rgb/<fov>.png`` fields of view and ``csv/<fov>.csv`` with one row per nucleus:
a class column (``main_classification``, else ``super_classification``, else
``raw_classification``) and ``xmin, ymin, xmax, ymax`` (px; ``type``, ``coords_x``,
``coords_y`` are read past). Centre = box centre ``((xmin + xmax) / 2, (ymin + ymax) / 2)``
in the release's continuous coordinates (pixel edges at integers, as HistomicsUI writes
them), i.e. already LabelledTile's pixel-centre-at-.5 convention; at 0.2 µm/px the
possible half-pixel ambiguity is 0.1 µm.

Classes (case-insensitive): lymphocyte, plasma_cell, sTIL, TIL → lymphocyte;
unlabeled, AMBIGUOUS → UNCLASSIFIED; the known tumour, stromal, macrophage, granulocyte,
epithelial, endothelial, apoptotic, mitotic and other-nucleus names (OTHER_NAMES) → other;
any other name → UNCLASSIFIED (warned, counted in LoadStats.unknown_classes). No regions.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from tilscore.errors import InputError
from tilscore.training.importers.labelled import CELL_CODES, UNCLASSIFIED, LabelledTile
from tilscore.training.importers.native import (
    LoadStats,
    begin,
    clean_points,
    list_images,
    read_rgb,
    require_tiles,
    resolve_mpp,
)

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.2
CLASS_COLUMNS = ("main_classification", "super_classification", "raw_classification")
BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")
LYMPHOCYTE_NAMES = {"lymphocyte", "plasma_cell", "stil", "til", "tils"}
UNCLASSIFIED_NAMES = {"unlabeled", "unlabelled", "ambiguous"}
OTHER_NAMES = {
    "tumor", "tumor_nonmitotic", "tumor_mitotic", "tumor_any", "mitotic_figure",
    "nontilnonmq_stromal", "nontil_stromal", "fibroblast", "vascular_endothelium",
    "macrophage", "other_nucleus", "apoptotic_body", "eosinophil", "neutrophil",
    "myoepithelium", "ductal_epithelium",
}


def class_code(name: str, source: Path, *, stats: LoadStats) -> int:
    """CELL_CODES value or UNCLASSIFIED for a NuCLS class name."""
    low = name.strip().lower()
    if low in LYMPHOCYTE_NAMES:
        return CELL_CODES["lymphocyte"]
    if low in OTHER_NAMES:
        return CELL_CODES["other"]
    if low not in UNCLASSIFIED_NAMES:
        stats.unknown(name, str(source))
    return UNCLASSIFIED


def read_boxes(path: Path, stats: LoadStats) -> tuple[np.ndarray, np.ndarray]:
    """float64 (N, 2) box centres and int64 (N,) codes from one NuCLS CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read CSV ({exc})") from exc
    if not rows:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    class_column = next((c for c in CLASS_COLUMNS if c in columns), None)
    missing = [c for c in BOX_COLUMNS if c not in columns]
    if class_column is None or missing:
        need = missing + ([] if class_column else ["main_classification|raw_classification"])
        raise InputError(f"{path}: missing CSV columns {', '.join(need)}")
    xy, cls = [], []
    for line, row in enumerate(rows, start=2):
        try:
            x0, y0, x1, y1 = (float(row[c]) for c in BOX_COLUMNS)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: line {line}: box coordinates are not numbers") from exc
        xy.append(((x0 + x1) / 2, (y0 + y1) / 2))
        cls.append(class_code(row[class_column] or "", path, stats=stats))
    return np.asarray(xy, np.float64), np.asarray(cls, np.int64)


def load_nucls(folder: Path, mpp: float | None = None, *, stats: LoadStats | None = None
               ) -> list[LabelledTile]:
    """Point-only tiles (``region=None``) from NuCLS boxes; `mpp` overrides 0.2 µm/px."""
    folder, stats = begin(folder, mpp, stats=stats)
    tile_mpp = resolve_mpp(mpp, DEFAULT_MPP, source=str(folder))
    tiles = []
    for path in list_images(folder / "rgb"):
        csv_path = folder / "csv" / f"{path.stem}.csv"
        if not csv_path.exists():
            raise InputError(f"{path}: no labels; expected {csv_path}")
        xy, cls = read_boxes(csv_path, stats)
        image = read_rgb(path, stats)
        if image is None:
            continue
        xy, cls = clean_points(xy, cls, shape_hw=image.shape[:2], source=csv_path, stats=stats)
        tiles.append(LabelledTile(image=image, mpp=tile_mpp, region=None, points_xy=xy,
                                  point_cls=cls, has_cells=True, source=str(path)))
    return require_tiles(tiles, folder, stats=stats)
