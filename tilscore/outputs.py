"""A slide's outputs: the ``summary.json`` record (:func:`summary_record`: who scored what
with which model and settings, and the :class:`~tilscore.slide_score.SlideScore`) and
every file of its folder (:func:`write_outputs`: cells CSV and GeoJSON, regions GeoJSON,
OME-Zarr maps, overlay, then summary.json, which marks the folder complete)."""

from __future__ import annotations

import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tilscore import __version__
from tilscore.engine.fast import FastPlan, mask_unsearched
from tilscore.engine.infer import SlidePrediction, usable_cores
from tilscore.engine.load import Engine, config_hash
from tilscore.engine.stitch import RegionCanvas
from tilscore.inputs import InputSlide
from tilscore.io import atomic
from tilscore.io.cells import write_cells_csv
from tilscore.io.colors import CLASS_COLORS
from tilscore.io.geojson import write_cells_geojson, write_regions_geojson
from tilscore.io.ome_zarr import write_ome_zarr
from tilscore.io.overlay import write_overlay_png
from tilscore.scoring.aggregate import RegionSummary, tissue_area_grid
from tilscore.scoring.ihc_cells import MEASUREMENTS
from tilscore.scoring.score import COMPARTMENT_OF_REGION, ScoreConfig, density_map
from tilscore.scoring.slide_score import CellTable, SlideScore, counted_class, score_settings_used
from tilscore.summary import check_summary

WRITE_THREADS: int | None = None  # output files written at once (None: one per usable core)


def summary_record(item: InputSlide, score: SlideScore, *, engine: Engine, cfg: ScoreConfig,
                   slide_mpp: float, prediction: SlidePrediction, plan: FastPlan | None = None,
                   command: str | None = None) -> dict:
    """The ``summary.json`` record of `item` (without the write time and runtime, added by
    :func:`write_outputs`): the slide, its stain and mpp, the model(s), mode, version,
    :func:`~tilscore.engine_load.config_hash`, `command` (the command line that ran it,
    None when not run from one), device and precision, the score, the device pass's
    timings, the resolved score settings and the input's pass-through metadata."""
    card = engine.card
    fast = {} if plan is None else {"fast": plan.as_dict(engine.region_card)}
    return {
        "slide": item.slide_id,
        "path": str(item.path),
        "stain": score.stain,
        "mpp": slide_mpp,
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
        "mode": engine.mode,
        **fast,
        "tilscore_version": __version__,
        "config_hash": config_hash(card, score.stain, cfg=cfg, region_card=engine.region_card),
        "command": command,
        "device": str(engine.device),
        "precision": "bfloat16" if engine.predictor.use_bf16 else "float32",
        **score.as_dict(),
        "timings_s": {k: round(v, 3) for k, v in prediction.timings_s.items()},
        "score_config": score_settings_used(score.stain, cfg),
        "metadata": dict(item.metadata),  # pass-through manifest columns
    }


def write_outputs(work: Path, summary: dict, *, cells: CellTable, regions: RegionSummary,
                  overlay: tuple[np.ndarray, float], slide_mpp: float,
                  extent_um: tuple[float, float], cfg: ScoreConfig, canvas: RegionCanvas,
                  t0: float, plan: FastPlan | None = None) -> None:
    """Every output into the work folder `work`; summary.json last (it marks
    completeness), with the time spent writing the others and the slide's runtime since
    `t0` (perf_counter). `overlay`: (uint8 RGB thumbnail, its µm/px); `canvas`: the
    stitched region map; the maps cover the slide's extent (w, h) in µm, `extent_um`; in
    the fast mode (`plan`) the density map is NaN where no cells were searched."""
    t_write = time.perf_counter()
    region_names = COMPARTMENT_OF_REGION
    stain = summary["stain"]
    # without a compartment model (--model none) all tissue is "other": nothing to tint
    tinted = {} if summary["areas_mm2"]["tumour"] is None else dict(region_names)
    image_size_l0 = (extent_um[0] / slide_mpp, extent_um[1] / slide_mpp)
    extra = _ihc_columns(cells) + (("tumour_distance_um",) if "tumour_distance_um" in cells
                                   else ())
    radius_px = cfg.lymphocyte_nucleus_diameter_um / 2 / slide_mpp
    counted = counted_class(stain)
    mine = cells["class"] == counted
    pts = np.stack([cells["x_um"], cells["y_um"]], axis=1)
    geo_cells, geo_measurements, geo_properties = _geojson_cells(cells, stain)

    def maps() -> None:
        dmap = _density(canvas, pts[mine], extent_um, cfg.density_grid_um)
        if plan is not None:
            dmap = mask_unsearched(dmap, plan.cell_grid, grid_um=cfg.density_grid_um)
        density_name = "til_density" if stain == "he" else f"{counted}_density"
        write_ome_zarr(work / "maps.zarr", canvas.labels_within(extent_um),
                       mpp_labels=canvas.mpp, density_map=dmap, density_mpp=cfg.density_grid_um,
                       class_names=region_names, colors=CLASS_COLORS,
                       density_name=density_name, density_unit=f"{counted} cells per mm²")

    # Independent files, written at once: numpy, zlib, PIL and zarr release the GIL for
    # most of their work (on a GPU node's spare cores this is ~ the slowest writer).
    jobs = [
        lambda: write_cells_csv(work / "cells.csv", cells, extra=extra),
        lambda: write_cells_geojson(work / "cells.geojson", geo_cells, radius_px=radius_px,
                                    colors=CLASS_COLORS,
                                    measurements=geo_measurements, properties=geo_properties),
        # the region map the summary's areas count, clipped to the image
        lambda: write_regions_geojson(work / "regions.geojson",
                                      canvas.labels_within(extent_um),
                                      scale_to_l0=canvas.mpp / slide_mpp,
                                      class_names=region_names, colors=CLASS_COLORS,
                                      mpp_l0=slide_mpp, image_size_l0=image_size_l0),
        maps,
        lambda: write_overlay_png(
            work / "overlay.png", overlay[0], thumb_mpp=overlay[1], labels=regions.labels,
            labels_mpp=regions.coarse_mpp, cells_xy_um=pts[mine],
            legend={n: CLASS_COLORS[n] for n in (*tinted.values(), counted)},
            title=_overlay_title(summary), class_names=tinted),
    ]
    threads = min(len(jobs), WRITE_THREADS or usable_cores())
    with ThreadPoolExecutor(threads, thread_name_prefix="write") as pool:
        for fut in [pool.submit(job) for job in jobs]:
            fut.result()  # the first error is raised, once the others have finished
    shutil.rmtree(work / ".canvas.zarr", ignore_errors=True)  # the working canvas (read above)
    now = time.perf_counter()
    summary["timings_s"]["write"] = round(now - t_write, 3)
    summary["runtime_s"] = round(now - t0, 3)
    # what every reader checks (tilscore.summary): a mismatch fails this slide now
    atomic.write_json(work / "summary.json", check_summary(_jsonable(summary)))


def _density(canvas: RegionCanvas, points_xy_um: np.ndarray, extent_um: tuple[float, float],
             grid_um: float) -> np.ndarray:
    """The density map: points per mm² of the tissue in each grid cell of the region map
    (NaN where a cell holds none; :func:`tilscore.score.density_map`)."""
    tissue = tissue_area_grid(canvas.labels_within(extent_um), canvas.mpp, grid_um=grid_um,
                              extent_um=extent_um)
    return density_map(points_xy_um, tissue, grid_um=grid_um)


def _ihc_columns(cells: CellTable) -> tuple[str, ...]:
    """The IHC measurement columns present in `cells` (none on H&E), in cells.csv order."""
    return tuple(k for k in MEASUREMENTS if k in cells)


# cells.geojson on IHC: QuPath's measurement names ("{channel}: {compartment}: {stat}",
# as QuPath's ObjectMeasurements writes them) for the cells.csv columns. DAB values are in
# QuPath's log10 optical density (cells.csv and the summary keep natural-log OD).
QUPATH_MEASUREMENTS = {"DAB: Nucleus: Mean": "dab_nucleus_od",
                       "DAB: Membrane: Mean": "dab_membrane_od",
                       "DAB: Background: Mean": "dab_background_od",
                       "DAB: Marker: Mean": "dab_od"}
QUPATH_PLAIN = {"Nucleus: Area µm^2": "nucleus_area_um2",
                "Nucleus: Axis ratio": "nucleus_axis_ratio",
                "Nucleus: Hematoxylin fraction": "haematoxylin_fraction",
                "Intensity bin": "intensity_bin"}


def _geojson_cells(cells: CellTable, stain: str) -> tuple[dict, dict | None, dict | None]:
    """(cells, measurements, properties) for :func:`~tilscore.io.geojson.write_cells_geojson`:
    on H&E the table as it is; on IHC QuPath's conventions: classes ``Positive`` /
    ``Negative``, the marker and the gate as properties, the per-cell measurements under
    QuPath's names (:data:`QUPATH_MEASUREMENTS`, log10 OD; :data:`QUPATH_PLAIN`)."""
    if stain == "he" or "dab_od" not in cells:
        return cells, None, None
    positive = cells["class"] == counted_class(stain)
    table = {**cells, "class": np.where(positive, "Positive", "Negative")}
    log10 = 1.0 / math.log(10.0)
    measurements = {name: np.asarray(cells[k], np.float64) * log10
                    for name, k in QUPATH_MEASUREMENTS.items() if k in cells}
    measurements.update({name: np.asarray(cells[k], np.float64)
                         for name, k in QUPATH_PLAIN.items() if k in cells})
    properties = {"marker": np.full(len(positive), stain)}
    if "gate" in cells:
        properties["gate"] = cells["gate"]
    return table, measurements, properties


def _overlay_title(summary: dict) -> str:
    til, pos = summary.get("stromal_til_percent"), summary.get("percent_positive")
    if til is not None:
        return f"{summary['slide']}: sTIL {til:.1f} %"
    if pos is not None:
        return f"{summary['slide']}: {summary['stain'].upper()}+ {pos:.1f} % of cells"
    return summary["slide"]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float):
        return round(obj, 6)
    return obj
