"""Importers of labelled-tile datasets into :class:`LabelledTile` (see labelled.py).

``load_folder(folder, mpp=None, fmt="auto", stats=None)`` reads any supported format
(native, crchp, consep, tiger, bcss, nucls, qupath; ``detect_format`` picks it);
``write_native(folder, tiles)`` writes tilscore's own format. Layouts and label mappings:
docs/data-formats.md.
"""

from tilscore.training.importers.bcss import load_bcss
from tilscore.training.importers.consep import load_consep
from tilscore.training.importers.crchp import load_crchp, weak_regions
from tilscore.training.importers.detect import LOADERS, detect_format, load_folder
from tilscore.training.importers.labelled import (
    CELL_CODES,
    IGNORE,
    REGION_CODES,
    UNCLASSIFIED,
    LabelledTile,
    card_cell_index,
)
from tilscore.training.importers.native import LoadStats, load_native, write_native
from tilscore.training.importers.nucls import load_nucls
from tilscore.training.importers.qupath import load_qupath
from tilscore.training.importers.tiger import load_tiger

__all__ = [
    "CELL_CODES", "IGNORE", "LOADERS", "REGION_CODES", "UNCLASSIFIED", "LabelledTile",
    "LoadStats", "card_cell_index", "detect_format", "load_bcss", "load_consep", "load_crchp",
    "load_folder", "load_native", "load_nucls", "load_qupath", "load_tiger", "weak_regions",
    "write_native",
]
