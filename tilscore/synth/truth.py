"""Exact ground truth of a synthetic scene, computed without rendering: cell counts per
class and compartment, the truth cells as CSV, and :func:`scene_truth` (the tilscore
``summary.json`` keys with exact values). The TIFF writer (:mod:`tilscore.synth.writer`)
writes them beside each slide; :meth:`~tilscore.synth.scene.SyntheticScene.truth` returns
them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tilscore.synth.scene import BLOCK_UM, LYMPH_RADIUS_UM, SyntheticScene

GENERATOR = "tilscore.synth/1"
TIGER_CELL_AREA_UM2 = 64.0  # TIGER baseline: 100 x N_TIL x 64 µm² / stromal area
LYMPH_NUCLEUS_AREA_UM2 = math.pi * LYMPH_RADIUS_UM**2  # exact: synthetic nuclei are discs
AREA_STEP_UM = 2.0  # truth area integration grid (relative error ~1e-3)
_COMPARTMENTS = ("tumour", "stroma", "other")
CSV_COLUMNS = ("x_px", "y_px", "x_um", "y_um", "class", "compartment", "positive", "cell_type")


def cell_classes(stain: str) -> tuple[str, ...]:
    """Truth count classes: H&E lymphocyte/tumour/other; IHC <marker>_positive, negative,
    lymphocyte."""
    if stain == "he":
        return ("lymphocyte", "tumour", "other")
    return (f"{stain}_positive", "negative", "lymphocyte")


def iter_cell_strips(scene: SyntheticScene) -> Iterator[dict]:
    """Cells of the whole slide (pen excluded), one horizontal strip (block row) at a time;
    the strips partition the slide, so every cell comes exactly once."""
    strip_px = max(1, int(BLOCK_UM / scene.mpp))
    for y0 in range(0, scene.height_px, strip_px):
        y1 = min(y0 + strip_px, scene.height_px)
        yield scene.cells(0, y0, x1=scene.width_px, y1=y1)


def _class_masks(scene: SyntheticScene, cells: dict) -> dict[str, np.ndarray]:
    """Boolean mask per truth class (a cell may be in two: e.g. negative and lymphocyte)."""
    if scene.stain == "he":
        return {c: cells["cls"] == c for c in cell_classes("he")}
    pos_name, neg_name, lymph_name = cell_classes(scene.stain)
    return {pos_name: cells["positive"], neg_name: ~cells["positive"],
            lymph_name: cells["cls"] == "lymphocyte"}


def _zero_counts(stain: str) -> dict[str, dict[str, int]]:
    return {c: {k: 0 for k in (*_COMPARTMENTS, "tissue")} for c in cell_classes(stain)}


def _add_counts(counts: dict, masks: dict[str, np.ndarray], compartment: np.ndarray) -> None:
    for name, mask in masks.items():
        for comp in _COMPARTMENTS:
            n = int(np.count_nonzero(mask & (compartment == comp)))
            counts[name][comp] += n
            counts[name]["tissue"] += n


def count_cells(scene: SyntheticScene) -> dict[str, dict[str, int]]:
    """Cell counts {class: {tumour, stroma, other, tissue}} from block-wise generation."""
    counts = _zero_counts(scene.stain)
    for cells in iter_cell_strips(scene):
        _add_counts(counts, _class_masks(scene, cells), cells["compartment"])
    return counts


def write_cells_csv(scene: SyntheticScene, path: Path) -> dict[str, dict[str, int]]:
    """Stream the truth cells to CSV (columns ``CSV_COLUMNS``) and return their counts.

    ``class`` follows tilscore's cells.csv (H&E: lymphocyte/tumour/other; IHC:
    <marker>_positive/negative); ``cell_type`` is the biological class for every stain;
    ``positive`` is 1/0."""
    counts = _zero_counts(scene.stain)
    marker = f"{scene.stain}_positive"
    with open(path, "w", newline="") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for cells in iter_cell_strips(scene):
            _add_counts(counts, _class_masks(scene, cells), cells["compartment"])
            if scene.stain == "he":
                cls = cells["cls"]
            else:
                cls = np.where(cells["positive"], marker, "negative")
            rows = zip(cells["x_px"], cells["y_px"], cls, cells["compartment"],
                       cells["positive"], cells["cls"], strict=True)
            f.writelines(f"{x:.2f},{y:.2f},{x * scene.mpp:.3f},{y * scene.mpp:.3f},{c},{k},"
                         f"{int(p)},{t}\n" for x, y, c, k, p, t in rows)
    return counts


def scene_truth(scene: SyntheticScene, slide_id: str = "synthetic",
                *, counts: dict | None = None) -> dict:
    """Exact ground truth in tilscore ``summary.json`` keys, computed without rendering.

    - ``areas_mm2``: region areas by the midpoint rule on a 2 µm grid (relative error
      ~1e-3); ``tissue`` = tumour + stroma + other; pen-covered tissue is excluded.
    - ``counts`` / ``densities_per_mm2``: {class: {tumour, stroma, other, tissue}}, cells
      per compartment (region at the nucleus centre) and per mm² of that compartment.
    - ``stromal_til_percent`` = 100 x N_lymphocytes_in_stroma x π(3.5 µm)² / stroma area:
      the exact fraction of stroma covered by lymphocyte nuclei (they never overlap).
      Stroma here is all stroma (the synthetic tumour bulk is the whole tissue).
    - ``til_score_tiger`` = 100 x N_lymphocytes_in_stroma x 64 µm² / stroma area.
    - ``percent_positive`` (IHC; None for H&E) = 100 x positive / all cells in tissue.
    """
    counts = count_cells(scene) if counts is None else counts
    areas = scene.label_areas_mm2(AREA_STEP_UM)
    dens = {cls: {comp: (n / areas[comp] if areas[comp] > 0 else 0.0)
                  for comp, n in by_comp.items()} for cls, by_comp in counts.items()}
    lymph = counts["lymphocyte"]["stroma"]
    stroma_um2 = areas["stroma"] * 1e6

    def pct(cell_area_um2: float) -> float:
        return 100.0 * lymph * cell_area_um2 / stroma_um2 if stroma_um2 > 0 else 0.0

    percent_positive = None
    if scene.stain != "he":
        pos = counts[f"{scene.stain}_positive"]["tissue"]
        total = pos + counts["negative"]["tissue"]
        percent_positive = 100.0 * pos / total if total else 0.0
    return {
        "slide": slide_id, "stain": scene.stain, "mpp": scene.mpp,
        "areas_mm2": {k: areas[k] for k in ("tissue", "tumour", "stroma", "other")},
        "counts": counts, "densities_per_mm2": dens,
        "stromal_til_percent": pct(LYMPH_NUCLEUS_AREA_UM2),
        "til_score_tiger": pct(TIGER_CELL_AREA_UM2),
        "percent_positive": percent_positive,
        "til_parts": {"lymphocytes_in_stroma": lymph, "stroma_area_mm2": areas["stroma"],
                      "lymphocyte_nucleus_area_um2": LYMPH_NUCLEUS_AREA_UM2,
                      "tiger_cell_area_um2": TIGER_CELL_AREA_UM2},
        "seed": scene.seed, "size_px": [scene.width_px, scene.height_px],
        "generator": GENERATOR, "area_step_um": AREA_STEP_UM, "scene": scene.knobs(),
        "positive_fraction": scene.positive_fraction,
    }
