"""Format registry, auto-detection and :func:`load_folder`.

Detection rules, first match wins (``folder`` is the dataset root):

1. ``dataset.json`` with a ``"format"`` key → that format ("tilscore-native" → native).
2. ``tiger-coco.json`` → tiger.
3. ``points/*.json``, ``images/`` and ``masks/`` → consep; ``points/*.json`` and
   ``images/`` → crchp.
4. ``rgb/`` and ``csv/`` → nucls.
5. a ``*.geojson`` in the folder, ``annotations/`` or ``images/`` → qupath.
6. ``masks/`` and an image folder → tiger when the image names hold TIGER's bracketed ROI
   coordinates (``..._[x0, y0, x1, y1].png``), else bcss (TIGER masks without
   ``tiger-coco.json`` and other names: pass ``fmt="tiger"`` or add ``dataset.json``
   ``{"format": "tiger"}``).
7. ``images/`` with ``regions/``, ``cells/`` or ``dataset.json`` → native.

Nothing matches → UsageError listing the formats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tilscore.errors import InputError, UsageError
from tilscore.training.importers.bcss import image_dir, load_bcss
from tilscore.training.importers.consep import load_consep
from tilscore.training.importers.crchp import load_crchp
from tilscore.training.importers.labelled import LabelledTile
from tilscore.training.importers.native import (
    NATIVE_FORMAT,
    LoadStats,
    list_images,
    load_native,
    read_json,
)
from tilscore.training.importers.nucls import load_nucls
from tilscore.training.importers.qupath import load_qupath
from tilscore.training.importers.tiger import COCO_NAME, load_tiger

log = logging.getLogger(__name__)

LOADERS: dict[str, Callable[..., list[LabelledTile]]] = {
    "native": load_native,
    "crchp": load_crchp,
    "consep": load_consep,
    "tiger": load_tiger,
    "bcss": load_bcss,
    "nucls": load_nucls,
    "qupath": load_qupath,
}
_ALIASES = {NATIVE_FORMAT: "native", "tilscore": "native"}


def _choices() -> str:
    return ", ".join(LOADERS)


def _declared(folder: Path) -> str | None:
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    declared = meta.get("format") if isinstance(meta, dict) else None
    if declared is None:
        return None
    name = _ALIASES.get(str(declared).lower(), str(declared).lower())
    if name not in LOADERS:
        raise UsageError(f"{meta_path}: unknown format {declared!r}; supported: {_choices()}")
    return name


def detect_format(folder: Path) -> str:
    """Name of the format of `folder` (a key of LOADERS); rules in the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    if declared := _declared(folder):
        return declared
    if (folder / COCO_NAME).is_file():
        return "tiger"
    if (folder / "images").is_dir() and any((folder / "points").glob("*.json")):
        return "consep" if (folder / "masks").is_dir() else "crchp"
    if (folder / "rgb").is_dir() and (folder / "csv").is_dir():
        return "nucls"
    if any(any((folder / sub).glob("*.geojson")) for sub in (".", "annotations", "images")):
        return "qupath"
    images = image_dir(folder)
    if (folder / "masks").is_dir() and images is not None:
        names = [p.name for p in list_images(images)[:20]]
        return "tiger" if any("[" in n and "]" in n for n in names) else "bcss"
    if (folder / "images").is_dir() and any(
        (folder / p).exists() for p in ("regions", "cells", "dataset.json")
    ):
        return "native"
    raise UsageError(
        f"{folder}: not a labelled-tile dataset in a supported format ({_choices()}); "
        "see docs/data-formats.md for the layouts"
    )


def load_folder(folder: Path, mpp: float | None = None, *, fmt: str = "auto",
                stats: LoadStats | None = None) -> list[LabelledTile]:
    """Labelled tiles of `folder` in format `fmt` ("auto" detects it).

    `mpp` (µm/px) overrides the dataset's own pixel size. Pass a LoadStats as `stats` to
    learn what was skipped (unreadable images), dropped or clamped (points outside the
    image) and which class names were unknown. InputError "no labelled tiles in <folder>"
    when nothing loads; UsageError for an unknown `fmt`.
    """
    name = detect_format(folder) if fmt == "auto" else _ALIASES.get(fmt.lower(), fmt.lower())
    if name not in LOADERS:
        raise UsageError(f"unknown dataset format {fmt!r}; supported: auto, {_choices()}")
    log.info("%s: loading as %s", folder, name)
    return LOADERS[name](Path(folder), mpp=mpp, stats=stats)
