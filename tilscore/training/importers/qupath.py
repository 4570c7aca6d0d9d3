"""QuPath GeoJSON exports (objects in pixel coordinates of their image).

Layout: ``images/<id>.<ext>`` with ``<id>.geojson`` beside ``images/``, in
``annotations/`` or in ``images/``; a FeatureCollection, a list of features or one
feature. Optional ``dataset.json`` = ``{"mpp": 0.5}``; the `mpp` argument overrides it;
neither → MissingMppError.

Object type: ``properties.objectType`` (QuPath ≥ 0.3) or the feature ``id`` of older
exports (PathAnnotationObject, PathDetectionObject, PathCellObject).

* Annotation polygons (Polygon/MultiPolygon, holes cleared) → regions by classification
  name: Tumor/Tumour → tumour; Stroma → stroma; Immune cells, Necrosis, Other, Region* →
  other; Background → background; anything else or none → IGNORE. Larger areas are
  painted first, so a nested annotation wins over the one around it. Pixels under no
  annotation → IGNORE; a file without annotation polygons gives ``region=None``.
* Detections and cells (centroid of ``nucleusGeometry`` if present, else of the
  geometry) and Point/MultiPoint objects (each point a nucleus) → cells:
  Lymphocyte(s)/Immune cells/Plasma cell(s) → lymphocyte; Tumor/Tumour/Stroma/Other/
  Necrosis/... → other; no classification → UNCLASSIFIED. Derived classes use their first
  part ("Tumor: Positive" → Tumor). Unknown names → UNCLASSIFIED (warned, counted).
  No cell objects at all → ``has_cells=False``.

Coordinates: QuPath's continuous pixel coordinates (pixel (0, 0) spans [0, 1)), i.e. the
LabelledTile convention (pixel centres at .5); polygons cover the pixels whose centre
lies inside.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from shapely.geometry import shape
from skimage.draw import polygon as fill

from tilscore.errors import InputError
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
    list_images,
    read_json,
    read_rgb,
    require_tiles,
    resolve_mpp,
)

log = logging.getLogger(__name__)

REGION_NAMES = {"tumor": "tumour", "tumour": "tumour", "stroma": "stroma",
                "immune cells": "other", "necrosis": "other", "other": "other",
                "region*": "other", "background": "background"}
LYMPHOCYTE_NAMES = {"lymphocyte", "lymphocytes", "immune cells", "plasma cell", "plasma cells"}
OTHER_CELL_NAMES = {"tumor", "tumour", "stroma", "other", "necrosis", "fibroblast",
                    "macrophage", "epithelial", "neutrophil", "eosinophil"}
_OLD_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
            "PathCellObject": "cell", "PathTileObject": "tile"}


def find_geojson(folder: Path, stem: str) -> Path | None:
    """``<stem>.geojson`` in `folder`, ``annotations/`` or ``images/``, else None."""
    for sub in (".", "annotations", "images"):
        path = folder / sub / f"{stem}.geojson"
        if path.exists():
            return path
    return None


def _features(data, path: Path) -> list[dict]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list) or not all(isinstance(f, dict) for f in data):
        raise InputError(f"{path}: not GeoJSON features (FeatureCollection or feature list)")
    return data


def _class_name(props: dict) -> str:
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls
    return str(name).split(":")[0].strip().lower() if name else ""


def _object_type(feature: dict) -> str:
    props = feature.get("properties") or {}
    kind = props.get("objectType") or _OLD_IDS.get(str(feature.get("id")), "")
    if not kind:  # unmarked: polygons are annotations, points are detections
        poly = (feature.get("geometry") or {}).get("type") in ("Polygon", "MultiPolygon")
        kind = "annotation" if poly else "detection"
    return kind


def _cell_code(name: str, source: Path, stats: LoadStats) -> int:
    if not name:
        return UNCLASSIFIED
    if name in LYMPHOCYTE_NAMES:
        return CELL_CODES["lymphocyte"]
    if name in OTHER_CELL_NAMES:
        return CELL_CODES["other"]
    stats.unknown(name, str(source))
    return UNCLASSIFIED


def _paint(region: np.ndarray, geom, code: int) -> None:
    """Set pixels of uint8 (H, W) `region` whose centre lies in `geom` (holes excluded)."""
    for poly in getattr(geom, "geoms", [geom]):
        inside = np.zeros(region.shape, bool)
        for ring, value in [(poly.exterior, True)] + [(r, False) for r in poly.interiors]:
            xy = np.asarray(ring.coords)
            rows, cols = fill(xy[:, 1] - 0.5, xy[:, 0] - 0.5, region.shape)
            inside[rows, cols] = value
        region[inside] = code


def parse_features(features: list[dict], shape_hw, *, path: Path, stats: LoadStats):
    """(uint8 region or None, float64 (N, 2) points, int64 (N,) codes, has_cells)."""
    areas, xy, cls, has_cells = [], [], [], False
    for i, feature in enumerate(features):
        kind, props = _object_type(feature), feature.get("properties") or {}
        try:
            geom = shape(feature["geometry"])
            nucleus = feature.get("nucleusGeometry")
            nucleus = shape(nucleus) if nucleus else None
        except Exception as exc:  # shapely raises several types for bad geometry
            raise InputError(f"{path}: feature {i} has no valid geometry ({exc})") from exc
        name = _class_name(props)
        if kind == "annotation" and geom.geom_type in ("Polygon", "MultiPolygon"):
            region_name = REGION_NAMES.get(name)
            areas.append((geom.area, geom, REGION_CODES[region_name] if region_name else IGNORE))
        elif kind in ("annotation", "detection", "cell") and geom.geom_type in (
            "Point", "MultiPoint"
        ):
            has_cells = True
            for point in getattr(geom, "geoms", [geom]):
                xy.append((point.x, point.y))
                cls.append(_cell_code(name, path, stats))
        elif kind in ("detection", "cell"):
            has_cells = True
            centre = (nucleus or geom).centroid
            xy.append((centre.x, centre.y))
            cls.append(_cell_code(name, path, stats))
    region = None
    if areas:
        region = np.full(shape_hw, IGNORE, np.uint8)
        for _, geom, code in sorted(areas, key=lambda a: -a[0]):
            _paint(region, geom, code)
    return region, xy, cls, has_cells


def load_qupath(folder: Path, mpp: float | None = None, *, stats: LoadStats | None = None
                ) -> list[LabelledTile]:
    """Tiles from QuPath GeoJSON (rules in the module docstring)."""
    folder, stats = begin(folder, mpp, stats=stats)
    meta = read_json(folder / "dataset.json") if (folder / "dataset.json").exists() else {}
    if not isinstance(meta, dict):
        raise InputError(f"{folder / 'dataset.json'}: expected a JSON object")
    tile_mpp = resolve_mpp(mpp, meta.get("mpp"), source=str(folder))
    tiles = []
    for path in list_images(folder / "images"):
        geojson = find_geojson(folder, path.stem)
        if geojson is None:
            raise InputError(f"{path}: no labels; expected {folder / (path.stem + '.geojson')}")
        features = _features(read_json(geojson), geojson)
        image = read_rgb(path, stats)
        if image is None:
            continue
        region, xy, cls, has_cells = parse_features(features, image.shape[:2], path=geojson,
                                                    stats=stats)
        xy, cls = clean_points(xy, cls, shape_hw=image.shape[:2], source=geojson, stats=stats)
        tiles.append(LabelledTile(image=image, mpp=tile_mpp, region=region, points_xy=xy,
                                  point_cls=cls, has_cells=has_cells, source=str(path)))
    return require_tiles(tiles, folder, stats=stats)
