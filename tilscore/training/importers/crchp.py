"""CRCHistoPhenotypes (Sirinukunwattana et al., IEEE TMI 2016) nucleus points.

Layout: ``images/imgN.jpg`` (500x500 H&E, 0.55 µm/px) and ``points/imgN.json`` =
``{"mpp": 0.55, "split_of_original_authors": "train", "points": {"inflammatory": [[x, y],
...], "epithelial": ..., "fibroblast": ..., "others": ..., "all_nuclei": ...}}``.

Points: the JSON gives float ``[x, y]`` in 0-based pixel-*index* coordinates (the centre of
pixel 0 is 0.0; the original MATLAB 1-based values minus 1), so tile coordinates are
``x + 0.5, y + 0.5`` (LabelledTile: pixel centres at .5). inflammatory → lymphocyte,
epithelial → tumour, fibroblast → stromal, others → other; ``all_nuclei`` entries farther
than MATCH_PX from every class point → UNCLASSIFIED.

Weak regions (colorectal: epithelial nuclei = tumour epithelium, fibroblasts and
inflammatory cells = stroma), per pixel:

* within DISC_UM of an epithelial nucleus only → tumour; of a fibroblast/inflammatory
  nucleus only → stroma; of both kinds → IGNORE;
* bright (mean RGB > BRIGHT_MEAN and saturation < BRIGHT_SATURATION) and farther than
  FAR_UM from every nucleus (all_nuclei included) → background;
* everything else → IGNORE.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial import cKDTree

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
    normalise_split,
    read_json,
    read_rgb,
    require_tiles,
    resolve_mpp,
)

log = logging.getLogger(__name__)

DEFAULT_MPP = 0.55
MATCH_PX = 1.0  # an all_nuclei entry this close to a class point is that point
DISC_UM = 12.0  # radius of the region claimed by a labelled nucleus
FAR_UM = 25.0  # background only this far from any nucleus
BRIGHT_MEAN = 220  # mean of R, G, B (0-255) above which a pixel may be glass/lumen
BRIGHT_SATURATION = 0.15  # (max - min) / max of RGB below which a pixel is unstained
CLASS_LISTS = {
    "inflammatory": CELL_CODES["lymphocyte"],
    "epithelial": CELL_CODES["tumour"],  # colorectal adenocarcinoma epithelium
    "fibroblast": CELL_CODES["stromal"],
    "others": CELL_CODES["other"],
}
TUMOUR_LISTS, STROMA_LISTS = ("epithelial",), ("fibroblast", "inflammatory")


def _distance_px(points_xy: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """float32 (H, W): Euclidean distance (px) from each pixel centre to the pixel holding
    the nearest point; +inf everywhere when there are no points.

    OpenCV's exact (DIST_MASK_PRECISE) transform: equal to
    scipy.ndimage.distance_transform_edt to 1e-5 px and ~4x faster.
    """
    if len(points_xy) == 0:
        return np.full(shape_hw, np.inf, np.float32)
    seeds = np.ones(shape_hw, np.uint8)
    cols = np.clip(np.floor(points_xy[:, 0]).astype(int), 0, shape_hw[1] - 1)
    rows = np.clip(np.floor(points_xy[:, 1]).astype(int), 0, shape_hw[0] - 1)
    seeds[rows, cols] = 0
    return cv2.distanceTransform(seeds, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def weak_regions(image: np.ndarray, tumour_xy: np.ndarray, *, stroma_xy: np.ndarray,
                 all_xy: np.ndarray, mpp: float) -> np.ndarray:
    """uint8 (H, W) weak region map (rule in the module docstring).

    `image`: uint8 (H, W, 3) RGB; `*_xy`: float (N, 2) nucleus centres in tile pixels
    (pixel centres at .5); `all_xy` every nucleus, labelled or not; `mpp`: µm/px.
    """
    shape_hw = image.shape[:2]
    disc_px, far_px = DISC_UM / mpp, FAR_UM / mpp
    in_tumour = _distance_px(np.asarray(tumour_xy).reshape(-1, 2), shape_hw) <= disc_px
    in_stroma = _distance_px(np.asarray(stroma_xy).reshape(-1, 2), shape_hw) <= disc_px
    far = _distance_px(np.asarray(all_xy).reshape(-1, 2), shape_hw) > far_px
    r, g, b = (image[..., i].astype(np.float32) for i in range(3))
    top, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    saturation = (top - low) / np.maximum(top, 1.0)
    bright = ((r + g + b) / 3 > BRIGHT_MEAN) & (saturation < BRIGHT_SATURATION)
    region = np.full(shape_hw, IGNORE, np.uint8)
    region[in_tumour & ~in_stroma] = REGION_CODES["tumour"]
    region[in_stroma & ~in_tumour] = REGION_CODES["stroma"]
    region[bright & far & ~in_tumour & ~in_stroma] = REGION_CODES["background"]
    return region


def _point_list(points: dict, key: str, path: Path) -> np.ndarray:
    """float64 (N, 2) tile coordinates (+0.5: index → pixel-centre convention)."""
    value = points.get(key, [])
    try:
        xy = np.asarray(value, np.float64).reshape(-1, 2)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: points.{key} must be a list of [x, y] pairs") from exc
    return xy + 0.5


def _unclassified(all_xy: np.ndarray, class_xy: np.ndarray) -> np.ndarray:
    """Rows of `all_xy` farther than MATCH_PX from every row of `class_xy`."""
    if len(all_xy) == 0 or len(class_xy) == 0:
        return all_xy

    dist, _ = cKDTree(class_xy).query(all_xy, k=1)
    return all_xy[dist > MATCH_PX]


def load_crchp(folder: Path, mpp: float | None = None, *, stats: LoadStats | None = None
               ) -> list[LabelledTile]:
    """Tiles with class points, UNCLASSIFIED extra nuclei and weak regions (see module doc).

    `mpp` overrides the JSON's "mpp" (default 0.55 µm/px). ``split`` is "train"/"val" from
    ``split_of_original_authors``.
    """
    folder, stats = begin(folder, mpp, stats=stats)
    tiles = []
    for _, data, tile in typed_point_tiles(folder, mpp, default_mpp=DEFAULT_MPP,
                                           class_lists=CLASS_LISTS,
                                           tumour_lists=TUMOUR_LISTS, stroma_lists=STROMA_LISTS,
                                           stats=stats):
        tile.split = normalise_split(data.get("split_of_original_authors"))
        tiles.append(tile)
    return require_tiles(tiles, folder, stats=stats)


def typed_point_tiles(folder: Path, mpp: float | None, *, default_mpp: float,
                      class_lists: dict[str, int], tumour_lists: tuple[str, ...],
                      stroma_lists: tuple[str, ...], stats: LoadStats):
    """Yield (image path, points JSON, LabelledTile) for every readable image of a
    typed-point folder (``images/<name>`` + ``points/<name>.json``; :func:`typed_point_tile`),
    the tile's ``source`` set; unreadable images are skipped (recorded in `stats`)."""
    for path in list_images(folder / "images"):
        labelled = read_typed_points(path, folder, stats=stats)
        if labelled is None:
            continue
        image, data, json_path = labelled
        tile = typed_point_tile(image, data, json_path=json_path, mpp=mpp, default_mpp=default_mpp,
                                class_lists=class_lists,
                                tumour_lists=tumour_lists, stroma_lists=stroma_lists, stats=stats)
        tile.source = str(path)
        yield path, data, tile


def read_typed_points(path: Path, folder: Path, *, stats: LoadStats):
    """(image uint8 (H, W, 3), points JSON dict, its path) for ``images/<name>`` with its
    ``points/<name>.json``; None when the image is unreadable (recorded in `stats`)."""
    json_path = folder / "points" / f"{path.stem}.json"
    if not json_path.exists():
        raise InputError(f"{path}: no labels; expected {json_path}")
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("points"), dict):
        raise InputError(f"{json_path}: expected an object with a \"points\" object")
    image = read_rgb(path, stats)
    return None if image is None else (image, data, json_path)


def typed_point_tile(image: np.ndarray, data: dict, *, json_path: Path, mpp: float | None,
                     default_mpp: float, class_lists: dict[str, int],
                     tumour_lists: tuple[str, ...], stroma_lists: tuple[str, ...],
                     stats: LoadStats) -> LabelledTile:
    """A LabelledTile from typed nucleus points (``points.<class>`` lists mapped by
    `class_lists` to CELL_CODES; ``points.all_nuclei`` entries of no class →
    UNCLASSIFIED) with weak regions from the lists in `tumour_lists`/`stroma_lists`."""
    tile_mpp = resolve_mpp(mpp, data.get("mpp"), default_mpp, source=str(json_path))
    points = data["points"]
    lists = {key: _point_list(points, key, json_path) for key in class_lists}
    all_xy = _point_list(points, "all_nuclei", json_path)
    class_xy = np.concatenate(list(lists.values()))
    extra_xy = _unclassified(all_xy, class_xy)
    xy = np.concatenate([class_xy, extra_xy])
    cls = np.concatenate([np.full(len(v), class_lists[k], np.int64) for k, v in lists.items()]
                         + [np.full(len(extra_xy), UNCLASSIFIED, np.int64)])
    region = weak_regions(
        image,
        np.concatenate([lists[k] for k in tumour_lists]),
        stroma_xy=np.concatenate([lists[k] for k in stroma_lists]),
        all_xy=xy, mpp=tile_mpp,
    )
    xy, cls = clean_points(xy, cls, shape_hw=image.shape[:2], source=json_path, stats=stats)
    return LabelledTile(image=image, mpp=tile_mpp, region=region, points_xy=xy,
                        point_cls=cls, has_cells=True)
