"""One class → RGB colour table shared by every writer (GeoJSON, OME-Zarr, overlay).

QuPath keeps one colour per classification *name* for the whole project, so a name has
exactly one colour here: the region class ``tumour`` and the cell class ``tumour`` share
red, and the cell class ``other`` is drawn grey like the ``other`` region.
"""

from __future__ import annotations

RGB = tuple[int, int, int]

CLASS_COLORS: dict[str, RGB] = {
    # regions (and the cells that share their names)
    "tumour": (200, 0, 0),
    "stroma": (0, 150, 0),
    "other": (120, 120, 120),
    # H&E cells
    "lymphocyte": (0, 0, 255),
    "other_cell": (255, 200, 0),
    "stromal": (255, 140, 0),  # fibroblast/spindle nuclei
    # IHC cells
    "cd20_positive": (165, 42, 42),
    "foxp3_positive": (139, 69, 19),
    "negative": (100, 149, 237),
    # IHC cells in cells.geojson: QuPath's own classes and their default colours
    # (qupath-core PathClassFactory: Positive 200,50,50; Negative 112,112,225)
    "Positive": (200, 50, 50),
    "Negative": (112, 112, 225),
}

FALLBACK_COLOR: RGB = (160, 160, 160)


def color_of(name: str, colors: dict[str, RGB] | None = None) -> RGB:
    """RGB (0–255 ints) for a class name: `colors`, then `CLASS_COLORS`, then grey."""
    for table in (colors or {}, CLASS_COLORS):
        if name in table:
            r, g, b = table[name][:3]
            return int(r), int(g), int(b)
    return FALLBACK_COLOR
