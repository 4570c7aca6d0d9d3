"""tilscore's own labelled-tile format (read and write) and helpers shared by importers.

Layout (see docs/data-formats.md)::

    dataset.json        {"format": "tilscore-native", "mpp": 0.5, "name": ..., "licence": ...,
                         "tiles": {"<id>": {"mpp": 0.25, "split": "train"}}}   (tiles optional)
    images/<id>.png     uint8 RGB (also .jpg/.jpeg/.tif/.tiff/.bmp)
    regions/<id>.png    optional uint8 (H, W) codes of REGION_CODES, 255 = ignore
    cells/<id>.json     optional {"mpp": 0.5, "points": [{"x": 10.5, "y": 20.0,
                         "class": "lymphocyte"}, ...]}; pixel centres at .5
    nuclei/<id>.png     optional uint8 (H, W) lymphocyte-nucleus mask (0/1)

Pixel size, first found wins: the `mpp` argument, ``cells/<id>.json`` "mpp",
``dataset.json`` tiles[id].mpp, ``dataset.json`` "mpp"; none → MissingMppError.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tilscore.errors import InputError, MissingMppError, TilscoreError, UsageError
from tilscore.slide.base import validate_mpp
from tilscore.slide.image_backend import ImageBackend
from tilscore.training.importers.labelled import (
    CELL_CODES,
    IGNORE,
    REGION_CODES,
    UNCLASSIFIED,
    LabelledTile,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NATIVE_FORMAT = "tilscore-native"
EDGE_TOLERANCE_PX = 1.0  # points this close outside the tile are clamped in, not dropped
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val",
           "validation": "val", "test": "test", "testing": "test"}


@dataclass
class LoadStats:
    """What an import skipped or repaired (pass one in to see it; each event is also logged).

    ``skipped_images``: (file, reason) of unreadable images left out; ``dropped_points``:
    points further than EDGE_TOLERANCE_PX outside their tile; ``clamped_points``: points
    just outside moved onto the border; ``unknown_classes``: class name → count of labels
    whose name an importer did not know (mapped as its docstring says).
    """

    tiles: int = 0
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    dropped_points: int = 0
    clamped_points: int = 0
    unknown_classes: dict[str, int] = field(default_factory=dict)

    def unknown(self, name: str, source: str) -> None:
        if name not in self.unknown_classes:
            log.warning("%s: unknown class name %r", source, name)
        self.unknown_classes[name] = self.unknown_classes.get(name, 0) + 1


# -- helpers shared by the importers -----------------------------------------------------
def begin(folder: Path, mpp: float | None, *, stats: LoadStats | None) -> tuple[Path, LoadStats]:
    """Checks shared by every loader: `folder` exists, `mpp` (if given) is plausible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if mpp is not None:
        validate_mpp(mpp, "--mpp")
    return folder, stats if stats is not None else LoadStats()


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder` (IMAGE_EXTS), naturally sorted; [] if absent."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: [int(t) if t.isdigit() else t.lower()
                                        for t in re.split(r"(\d+)", p.name)])


def read_rgb(path: Path, stats: LoadStats) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB, or None (warning logged, counted) when unreadable/not RGB."""
    try:
        backend = ImageBackend(path)
        width, height = backend.level_dimensions[0]
        return backend.read_level(0, x=0, y=0, width=width, height=height)
    except TilscoreError as exc:
        log.warning("skipping %s: %s", path, exc)
        stats.skipped_images.append((str(path), str(exc)))
        return None


def read_json(path: Path):
    """Parsed JSON, or InputError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: invalid JSON ({exc})") from exc


def read_mask(path: Path, shape_hw: tuple[int, int]) -> np.ndarray:
    """Label image as int64 (H, W) of raw codes; InputError if unreadable, colour or mis-sized."""
    try:
        with Image.open(path) as image:
            mask = np.asarray(image)
    except Exception as exc:  # corrupt label: the user must fix it, not lose it silently
        raise InputError(f"{path}: cannot read label mask ({exc})") from exc
    if mask.ndim == 3:
        if not (mask[..., :3] == mask[..., :1]).all():
            raise InputError(f"{path}: colour mask; expected single-channel label codes")
        mask = mask[..., 0]
    if mask.shape != tuple(shape_hw):
        raise InputError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image is "
            f"{shape_hw[1]}x{shape_hw[0]} px"
        )
    return mask.astype(np.int64)


def clean_points(xy, cls, *, shape_hw, source: Path, stats: LoadStats):
    """Clamp points ≤ EDGE_TOLERANCE_PX outside [0, W) x [0, H) onto the border, drop others.

    Returns float64 (N, 2) x, y and int64 (N,) codes.
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    cls = np.asarray(cls, np.int64).reshape(-1)
    if not np.isfinite(xy).all():
        raise InputError(f"{source}: non-finite point coordinates")
    size = np.array([shape_hw[1], shape_hw[0]], np.float64)
    outside = (xy < 0) | (xy >= size)
    far = ((xy < -EDGE_TOLERANCE_PX) | (xy >= size + EDGE_TOLERANCE_PX)).any(axis=1)
    if far.any():
        log.warning("%s: dropped %d points outside the image", source, int(far.sum()))
        stats.dropped_points += int(far.sum())
    stats.clamped_points += int((outside.any(axis=1) & ~far).sum())
    xy = np.clip(xy[~far], 0.0, np.nextafter(size, 0))
    return xy, cls[~far]


def resolve_mpp(arg: float | None, *metadata, source: str) -> float:
    """µm/px: `arg` (the user's --mpp, UsageError if implausible) else the first non-None
    `metadata` value (InputError naming `source` if implausible); none → MissingMppError."""
    if arg is not None:
        return validate_mpp(arg, "--mpp")
    for value in metadata:
        if value is not None:
            try:
                return validate_mpp(value, source)
            except (TypeError, ValueError, UsageError) as exc:
                raise InputError(f"{source}: unusable mpp {value!r} (µm/px)") from exc
    raise MissingMppError(
        f"{source}: no pixel size (µm/px); add \"mpp\" to dataset.json or pass --mpp"
    )


def normalise_split(value) -> str | None:
    """"train"/"val"/"test" from common spellings; None stays None; others kept lower-case."""
    if value is None:
        return None
    return _SPLITS.get(str(value).strip().lower(), str(value).strip().lower())


def require_tiles(tiles: list[LabelledTile], folder: Path, *, stats: LoadStats) -> list:
    """`tiles`, or InputError when empty; logs a one-line summary."""
    stats.tiles = len(tiles)
    if not tiles:
        raise InputError(f"no labelled tiles in {folder}")
    log.info("%s: %d tiles (%d images skipped, %d points dropped)", folder, len(tiles),
             len(stats.skipped_images), stats.dropped_points)
    return tiles


# -- native format -----------------------------------------------------------------------
def _cell_code(name, source: Path) -> int:
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{source}: point class must be a non-empty string, got {name!r}")
    name = name.strip().lower()
    if name == "unclassified":
        return UNCLASSIFIED
    return CELL_CODES.get(name, CELL_CODES["other"])


def _read_cells(path: Path) -> tuple[list, list, float | None]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise InputError(f"{path}: expected an object with a \"points\" list")
    xy, cls = [], []
    for i, point in enumerate(data["points"]):
        try:
            xy.append((float(point["x"]), float(point["y"])))
            cls.append(_cell_code(point["class"], path))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: point {i} needs numeric x, y and a class") from exc
    return xy, cls, data.get("mpp")


def load_native(folder: Path, mpp: float | None = None, *, stats: LoadStats | None = None
                ) -> list[LabelledTile]:
    """Tiles of a native folder (layout in the module docstring), sorted by id."""
    folder, stats = begin(folder, mpp, stats=stats)
    meta = read_json(folder / "dataset.json") if (folder / "dataset.json").exists() else {}
    if not isinstance(meta, dict):
        raise InputError(f"{folder / 'dataset.json'}: expected a JSON object")
    per_tile = meta.get("tiles") or {}
    valid_codes = np.array(sorted([*REGION_CODES.values(), IGNORE]))
    tiles = []
    for path in list_images(folder / "images"):
        tile_id, info = path.stem, per_tile.get(path.stem) or {}
        image = read_rgb(path, stats)
        if image is None:
            continue
        cpath = folder / "cells" / f"{tile_id}.json"
        xy, cls, cell_mpp = _read_cells(cpath) if cpath.exists() else ([], [], None)
        tile_mpp = resolve_mpp(mpp, cell_mpp, info.get("mpp"), meta.get("mpp"),
                               source=str(folder))
        region = nucleus = None
        if (rpath := folder / "regions" / f"{tile_id}.png").exists():
            region = read_mask(rpath, image.shape[:2])
            if not np.isin(region, valid_codes).all():
                bad = sorted(set(np.unique(region).tolist()) - set(valid_codes.tolist()))
                raise InputError(f"{rpath}: region codes {bad} are not 0-3 or 255")
            region = region.astype(np.uint8)
        if (npath := folder / "nuclei" / f"{tile_id}.png").exists():
            nucleus = (read_mask(npath, image.shape[:2]) > 0).astype(np.uint8)
        xy, cls = clean_points(xy, cls, shape_hw=image.shape[:2], source=cpath, stats=stats)
        tiles.append(LabelledTile(
            image=image, mpp=tile_mpp, region=region, points_xy=xy, point_cls=cls,
            has_cells=cpath.exists(), nucleus_mask=nucleus, source=str(path),
            split=normalise_split(info.get("split")),
        ))
    return require_tiles(tiles, folder, stats=stats)


def _tile_ids(tiles: list[LabelledTile]) -> list[str]:
    ids, seen = [], set()
    for i, tile in enumerate(tiles):
        base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(tile.source).stem) if tile.source else ""
        base = base or f"tile_{i:05d}"
        name, n = base, 1
        while name in seen:
            name, n = f"{base}_{n}", n + 1
        seen.add(name)
        ids.append(name)
    return ids


def write_native(folder: Path, tiles: list[LabelledTile], *, name: str = "",
                 licence: str = "") -> list[str]:
    """Write `tiles` as a native folder (PNG images, lossless); returns the tile ids.

    Ids come from each tile's source file stem (made unique). UsageError if `folder`
    already holds a dataset.json (never mixes two datasets).
    """
    def save_png(sub: str, tile_id: str, array: np.ndarray) -> None:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(array, np.uint8)).save(folder / sub / f"{tile_id}.png")

    folder = Path(folder)
    if (folder / "dataset.json").exists():
        raise UsageError(f"{folder}: already holds a dataset.json; write to an empty folder")
    code_names = {v: k for k, v in CELL_CODES.items()} | {UNCLASSIFIED: "unclassified"}
    ids = _tile_ids(tiles)
    mpps = [round(float(t.mpp), 6) for t in tiles]
    common = max(set(mpps), key=mpps.count) if mpps else None
    meta = {"format": NATIVE_FORMAT, "version": 1, "mpp": common, "name": name,
            "licence": licence, "tiles": {}}
    for tile_id, tile, tile_mpp in zip(ids, tiles, mpps, strict=True):
        save_png("images", tile_id, tile.image)
        if tile.region is not None:
            save_png("regions", tile_id, tile.region)
        if tile.nucleus_mask is not None:
            save_png("nuclei", tile_id, np.asarray(tile.nucleus_mask) > 0)
        if tile.has_cells:
            points = [{"x": float(x), "y": float(y), "class": code_names[int(c)]}
                      for (x, y), c in zip(np.asarray(tile.points_xy).reshape(-1, 2),
                                           np.asarray(tile.point_cls).reshape(-1), strict=True)]
            (folder / "cells").mkdir(exist_ok=True)
            (folder / "cells" / f"{tile_id}.json").write_text(
                json.dumps({"mpp": tile_mpp, "points": points}), "utf-8")
        info = {k: v for k, v in (("mpp", tile_mpp), ("split", tile.split))
                if v is not None and not (k == "mpp" and v == common)}
        if info:
            meta["tiles"][tile_id] = info
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1), "utf-8")
    log.info("wrote %d tiles to %s", len(tiles), folder)
    return ids
