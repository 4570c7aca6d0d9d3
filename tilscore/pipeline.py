"""Scoring one slide and many: open → tissue → tiles → model → stitch → score → outputs.

Library functions only (no printing); the CLI reports. Each slide's outputs are written
into a temporary folder and renamed to ``OUT/<slide_id>/`` when complete, so a crash
never leaves a half-written slide folder; a failing slide is recorded in
``failures.csv`` and never stops the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilscore import __version__
from tilscore.errors import InputError, UsageError
from tilscore.inputs import InputSlide
from tilscore.io import atomic
from tilscore.score import ScoreConfig

log = logging.getLogger(__name__)

DEFAULT_MODELS = {"he": "he-default", "cd20": "ihc-default", "foxp3": "ihc-default"}
THUMBNAIL_MPP = 8.0  # µm/px: tissue detection (and the overlay of large slides)
OVERLAY_LONG_SIDE_PX = 1536  # overlay.png is rendered at about this size


@dataclass
class Engine:
    """What stays loaded across slides: the model, its card, the device, the predictor."""

    card: object
    device: object
    predictor: object

    @classmethod
    def load(cls, model: str | None, stain: str, device: str = "auto",
             cpu_threads: int | None = None) -> Engine:
        """`cpu_threads`: torch threads on CPU (None: every usable core)."""
        from tilscore.infer import Predictor, configure_cpu_threads, select_device
        from tilscore.models import load_model

        dev = select_device(device)
        if dev.type == "cpu":
            configure_cpu_threads(threads=cpu_threads)
        model_card(model, stain)  # a clear error before any weights are read
        net, card = load_model(model or DEFAULT_MODELS[stain])
        return cls(card, dev, Predictor(net, card, dev))


def model_card(model: str | None, stain: str):
    """The card of `model` (None: the stain's default), checked to support `stain`;
    reads only card.json, so a batch client can decide what to skip without weights."""
    from tilscore.models.card import ModelCard
    from tilscore.models.registry import MODELS_DIR, resolve_model_dir

    name = model or DEFAULT_MODELS[stain]
    if model is None and not (MODELS_DIR / name / "card.json").exists():
        shipped = sorted(p.parent.name for p in MODELS_DIR.glob("*/card.json"))
        raise UsageError(f"no default model for stain {stain!r} is installed "
                         f"(shipped: {', '.join(shipped) or 'none'}); pass --model")
    card = ModelCard.read(resolve_model_dir(name) / "card.json")
    if stain not in card.stains:
        raise UsageError(f"model {card.name} does not support stain {stain!r} "
                         f"(it supports: {', '.join(card.stains)})")
    return card


def score_slide(item: InputSlide, out_dir: Path, engine: Engine, stain: str = "he",
                mpp: float | None = None, cfg: ScoreConfig | None = None,
                read_threads: int = 2, batch_size: int = 8, quiet: bool = False) -> dict:
    """Score one slide into ``out_dir/<slide_id>/`` and return its summary dict.

    `mpp` overrides the file's pixel size unless the input carries its own (a manifest
    row). A tile progress bar (throughput, ETA) goes to stderr when it is a terminal and
    not `quiet`."""
    from tilscore.aggregate import region_summary
    from tilscore.infer import predict_slide
    from tilscore.slide import open_slide
    from tilscore.tiles import TileSpec, tile_grid
    from tilscore.tissue import tissue_mask_from_thumbnail

    cfg = cfg or ScoreConfig()
    card = engine.card
    t0 = time.perf_counter()
    final = out_dir / item.slide_id
    # Host and PID in the name: a later run removes it if this process was killed
    # (remove_stale_work_dirs); mkdtemp's random suffix keeps it unique across containers.
    work = Path(tempfile.mkdtemp(prefix=f".{item.slide_id}.tmp-{_host_tag()}-{os.getpid()}-",
                                 dir=out_dir))
    try:
        with open_slide(item.path, mpp=item.mpp if item.mpp is not None else mpp) as slide:
            slide_mpp = slide.mpp  # MissingMppError here names --mpp
            thumb = slide.thumbnail(THUMBNAIL_MPP)
            mask = tissue_mask_from_thumbnail(thumb, THUMBNAIL_MPP)
            spec = TileSpec(mpp=card.input_mpp, tile_px=card.tile_px, overlap_px=card.overlap_px)
            grid = tile_grid(slide.dimensions, slide_mpp, spec, mask)
            with _tile_bar(item.slide_id, len(grid), quiet) as bar:
                pred = predict_slide(slide, grid, engine.predictor, work / ".canvas.zarr",
                                     workers=read_threads, batch_size=batch_size, tissue=mask,
                                     progress=bar.update)
            regions = region_summary(pred.canvas, cfg)
            cells = _cell_table(pred.cells, card, slide_mpp, regions)
            summary = _summary(item, stain, slide, engine, mask, grid, pred, regions, cells,
                               cfg)
            overlay_mpp = _overlay_mpp(slide)
            overlay = thumb if overlay_mpp >= THUMBNAIL_MPP else slide.thumbnail(overlay_mpp)
            summary["runtime_s"] = round(time.perf_counter() - t0, 3)
            _write_outputs(work, summary, cells, regions, (overlay, overlay_mpp), slide_mpp,
                           card, cfg, pred)
        _publish(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _tile_bar(slide_id: str, total: int, quiet: bool):
    from tqdm import tqdm

    # disable=None: shown only on a terminal, so logs and CI stay clean.
    return tqdm(total=total, desc=slide_id, unit="tile", disable=True if quiet else None,
                dynamic_ncols=True, leave=False)


def _overlay_mpp(slide) -> float:
    """µm/px giving the overlay a long side of ~OVERLAY_LONG_SIDE_PX (never finer than the
    slide, never coarser than the tissue thumbnail)."""
    long_um = max(slide.dimensions) * slide.mpp
    return float(min(THUMBNAIL_MPP, max(slide.mpp, long_um / OVERLAY_LONG_SIDE_PX)))


def _cell_table(raw: dict, card, slide_mpp: float, regions) -> dict:
    """Cells on tissue with class names, µm coordinates, compartment, tumour-bulk flag."""
    from tilscore.score import COMPARTMENT_OF_REGION

    region = regions.compartment_at(raw["x_px"] * slide_mpp, raw["y_px"] * slide_mpp)
    on_tissue = region > 0
    t = {k: v[on_tissue] for k, v in raw.items()}
    t["region"] = region[on_tissue]
    names = np.array(card.cell_classes)
    comp_names = np.array(["other", *[COMPARTMENT_OF_REGION[k] for k in (1, 2, 3)]])
    x_um, y_um = t["x_px"] * slide_mpp, t["y_px"] * slide_mpp
    bi = np.clip((y_um / regions.coarse_mpp).astype(int), 0, regions.bulk.shape[0] - 1)
    bj = np.clip((x_um / regions.coarse_mpp).astype(int), 0, regions.bulk.shape[1] - 1)
    return {
        "x_px": t["x_px"], "y_px": t["y_px"], "x_um": x_um, "y_um": y_um,
        "class": names[t["cls"]], "cls": t["cls"], "score": t["score"],
        "compartment": comp_names[t["region"]], "in_bulk": regions.bulk[bi, bj]
        if regions.bulk.size else np.zeros(len(x_um), bool),
    }


def _summary(item, stain, slide, engine, mask, grid, pred, regions, cells, cfg) -> dict:
    from tilscore.score import counts_by_compartment, densities, fraction_near, stromal_tils

    card = engine.card
    areas = regions.areas
    counts = counts_by_compartment(list(card.cell_classes), cells["cls"], cells["compartment"])
    lymph = cells["class"] == "lymphocyte"
    stromal = lymph & (cells["compartment"] == "stroma")
    n_bulk_stroma = int((stromal & cells["in_bulk"]).sum())
    pts = np.stack([cells["x_um"], cells["y_um"]], axis=1)
    near = fraction_near(pts[stromal], regions.tumour, regions.coarse_mpp, cfg.near_tumour_um)
    summary = {
        "slide": item.slide_id,
        "path": str(item.path),
        "stain": stain,
        "mpp": slide.mpp,
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
        "tilscore_version": __version__,
        "config_hash": config_hash(engine.card, stain, cfg),
        "command": " ".join(sys.argv),
        "device": str(engine.device),
        "areas_mm2": areas.as_dict(),
        "counts": counts,
        "densities_per_mm2": densities(counts, areas),
        **stromal_tils(n_bulk_stroma, areas, cfg),
        "stromal_lymphocytes_near_tumour_fraction": near,
        "near_tumour_um": cfg.near_tumour_um,
        "qc": _qc(stain, slide, mask, pred, grid),
        "warnings": _warnings(areas, pred, mask) + _mpp_warnings(slide),
        "timings_s": {k: round(v, 3) for k, v in pred.timings_s.items()},
        "score_config": cfg.__dict__,
        "metadata": dict(item.metadata),  # pass-through manifest columns
    }
    return summary


def _qc(stain, slide, mask, pred, grid) -> dict:
    """QC numbers measured while scoring, and the flags they raise (tilscore.qc)."""
    from tilscore.qc import focus_threshold, out_of_focus_fraction, qc_flags

    threshold = focus_threshold(stain)
    qc = {
        "tissue_mask_area_mm2": mask.area_mm2,
        "pen_fraction": mask.pen_fraction,
        "mpp_source": slide.mpp_source,
        "tiles": pred.tiles,
        "failed_tiles": pred.failed_tiles,
        "out_of_focus_fraction": out_of_focus_fraction(pred.focus, grid.tissue_fraction,
                                                       threshold),
        "focus_threshold": threshold,
        "focus_median": (float(np.nanmedian(pred.focus))
                         if np.isfinite(pred.focus).any() else None),
    }
    qc["flags"] = qc_flags(qc, stain)
    return qc


def _mpp_warnings(slide) -> list[str]:
    """--mpp overrides the file; say so when the two disagree (a folder of mixed inputs)."""
    meta = slide.metadata_mpp
    if slide.mpp_source == "override" and meta and abs(slide.mpp / meta - 1) > 0.05:
        return [f"--mpp {slide.mpp:g} overrides the file's {meta:g} µm/px: areas and "
                "densities use the override"]
    return []


def _warnings(areas, pred, mask) -> list[str]:
    """Plain-language problems a reader of the numbers must know about."""
    out = []
    if len(pred.cells["x_px"]) == 0 and pred.tiles == 0:
        out.append("no tissue detected: all areas and counts are zero")
    elif areas.tumour == 0:
        out.append("no invasive tumour found: stromal TIL % is undefined")
    elif areas.stroma_in_bulk == 0:
        out.append("no stroma inside the tumour bulk: stromal TIL % is undefined")
    if pred.failed_tiles:
        out.append(f"{pred.failed_tiles} tiles failed to decode and were skipped")
    return out


def _write_outputs(work: Path, summary, cells, regions, overlay, slide_mpp, card, cfg,
                   pred) -> None:
    """Everything but summary.json; summary.json is written last (it marks completeness)."""
    from tilscore.io.cells import write_cells_csv
    from tilscore.io.colors import CLASS_COLORS
    from tilscore.io.geojson import write_cells_geojson, write_regions_geojson
    from tilscore.io.ome_zarr import write_ome_zarr
    from tilscore.io.overlay import write_overlay_png
    from tilscore.score import COMPARTMENT_OF_REGION as region_names
    from tilscore.score import density_map

    write_cells_csv(work / "cells.csv", {k: cells[k] for k in
                                         ("x_px", "y_px", "x_um", "y_um", "class",
                                          "compartment", "score")})
    radius_px = cfg.lymphocyte_nucleus_diameter_um / 2 / slide_mpp
    write_cells_geojson(work / "cells.geojson", cells, radius_px, CLASS_COLORS)
    write_regions_geojson(work / "regions.geojson", regions.labels,
                          regions.coarse_mpp / slide_mpp, region_names, CLASS_COLORS,
                          mpp_l0=slide_mpp)
    lymph = cells["class"] == "lymphocyte"
    pts = np.stack([cells["x_um"], cells["y_um"]], axis=1)
    dmap = density_map(pts[lymph], (pred.canvas.shape[1] * pred.canvas.mpp,
                                    pred.canvas.shape[0] * pred.canvas.mpp), cfg.density_grid_um)
    write_ome_zarr(work / "maps.zarr", pred.canvas.labels, pred.canvas.mpp, dmap,
                   cfg.density_grid_um, region_names, CLASS_COLORS)
    shutil.rmtree(work / ".canvas.zarr", ignore_errors=True)  # the working canvas
    til = summary.get("stromal_til_percent")
    title = f"{summary['slide']}: sTIL {til:.1f} %" if til is not None else summary["slide"]
    write_overlay_png(work / "overlay.png", overlay[0], overlay[1], regions.labels,
                      regions.coarse_mpp, pts[lymph],
                      {n: CLASS_COLORS[n] for n in ("tumour", "stroma", "other", "lymphocyte")},
                      title)
    atomic.write_json(work / "summary.json", _jsonable(summary))


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


def _publish(work: Path, final: Path) -> None:
    """Replace `final` by the complete `work` folder (old outputs removed only after)."""
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
    os.chmod(work, 0o777 & ~atomic.UMASK)  # mkdtemp makes 0700; outputs are shared
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def config_hash(card, stain: str, cfg: ScoreConfig) -> str:
    """Short hash of everything that changes a slide's numbers besides the slide itself
    (the model is identified separately by its sha256)."""
    key = {"stain": stain, "score": cfg.__dict__, "tile_px": card.tile_px,
           "overlap_px": card.overlap_px, "input_mpp": card.input_mpp,
           "heatmap": card.heatmap.model_dump(), "tilscore": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def remove_stale_work_dirs(out_dir: Path) -> list[Path]:
    """Delete work folders left in `out_dir` by killed runs on this host (their process is
    gone); folders of live processes or other hosts sharing the folder are left alone."""
    removed = []
    host = _host_tag()
    for path in out_dir.glob(".*.tmp-*"):
        tag = path.name.rsplit(".tmp-", 1)[1].split("-")
        if len(tag) >= 2 and tag[0] == host and tag[1].isdigit() and not _pid_alive(int(tag[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _host_tag() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["Engine", "InputError", "config_hash", "score_slide"]
