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
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tilscore import __version__
from tilscore.errors import InputError, TilscoreError, UsageError
from tilscore.inputs import InputSlide, expand_inputs
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
    def load(cls, model: str | None, stain: str, device: str = "auto") -> Engine:
        from tilscore.infer import Predictor, configure_cpu_threads, select_device
        from tilscore.models import load_model
        from tilscore.models.registry import MODELS_DIR

        dev = select_device(device)
        if dev.type == "cpu":
            configure_cpu_threads()
        name = model or DEFAULT_MODELS[stain]
        if model is None and not (MODELS_DIR / name / "card.json").exists():
            shipped = sorted(p.parent.name for p in MODELS_DIR.glob("*/card.json"))
            raise UsageError(f"no default model for stain {stain!r} is installed "
                             f"(shipped: {', '.join(shipped) or 'none'}); pass --model")
        net, card = load_model(name)
        if stain not in card.stains:
            raise UsageError(f"model {card.name} does not support stain {stain!r} "
                             f"(it supports: {', '.join(card.stains)})")
        return cls(card, dev, Predictor(net, card, dev))


@dataclass
class RunResult:
    """This run's rows (scored or skipped), failures, and ids skipped as already done."""

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def score_slide(item: InputSlide, out_dir: Path, engine: Engine, stain: str = "he",
                mpp: float | None = None, cfg: ScoreConfig | None = None,
                workers: int = 2, batch_size: int = 8, quiet: bool = False) -> dict:
    """Score one slide into ``out_dir/<slide_id>/`` and return its summary dict.

    A tile progress bar (throughput, ETA) goes to stderr when it is a terminal and not
    `quiet`."""
    from tilscore.aggregate import region_summary
    from tilscore.infer import predict_slide
    from tilscore.slide import open_slide
    from tilscore.tiles import TileSpec, tile_grid
    from tilscore.tissue import tissue_mask_from_thumbnail

    cfg = cfg or ScoreConfig()
    card = engine.card
    t0 = time.perf_counter()
    final = out_dir / item.slide_id
    # Unique per process and node (PIDs repeat across containers on a shared folder).
    work = Path(tempfile.mkdtemp(prefix=f".{item.slide_id}.tmp-", dir=out_dir))
    try:
        with open_slide(item.path, mpp=mpp) as slide:
            slide_mpp = slide.mpp  # MissingMppError here names --mpp
            thumb = slide.thumbnail(THUMBNAIL_MPP)
            mask = tissue_mask_from_thumbnail(thumb, THUMBNAIL_MPP)
            spec = TileSpec(mpp=card.input_mpp, tile_px=card.tile_px, overlap_px=card.overlap_px)
            grid = tile_grid(slide.dimensions, slide_mpp, spec, mask)
            with _tile_bar(item.slide_id, len(grid), quiet) as bar:
                pred = predict_slide(slide, grid, engine.predictor, work / ".canvas.zarr",
                                     workers=workers, batch_size=batch_size, tissue=mask,
                                     progress=bar.update)
            regions = region_summary(pred.canvas, cfg)
            cells = _cell_table(pred.cells, card, slide_mpp, regions)
            summary = _summary(item, stain, slide, engine, mask, pred, regions, cells, cfg)
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


def _summary(item, stain, slide, engine, mask, pred, regions, cells, cfg) -> dict:
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
        "config_hash": config_hash(engine, stain, cfg),
        "command": " ".join(sys.argv),
        "device": str(engine.device),
        "areas_mm2": areas.as_dict(),
        "counts": counts,
        "densities_per_mm2": densities(counts, areas),
        **stromal_tils(n_bulk_stroma, areas, cfg),
        "stromal_lymphocytes_near_tumour_fraction": near,
        "near_tumour_um": cfg.near_tumour_um,
        "qc": {
            "tissue_mask_area_mm2": mask.area_mm2,
            "pen_fraction": mask.pen_fraction,
            "mpp_source": slide.mpp_source,
            "tiles": pred.tiles,
            "failed_tiles": pred.failed_tiles,
        },
        "warnings": _warnings(areas, pred, mask) + _mpp_warnings(slide),
        "timings_s": {k: round(v, 3) for k, v in pred.timings_s.items()},
        "score_config": cfg.__dict__,
    }
    return summary


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
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    shutil.rmtree(old, ignore_errors=True)


def config_hash(engine: Engine, stain: str, cfg: ScoreConfig) -> str:
    """Short hash of everything that changes a slide's numbers besides the slide itself
    (the model is identified separately by its sha256)."""
    card = engine.card
    key = {"stain": stain, "score": cfg.__dict__, "tile_px": card.tile_px,
           "overlap_px": card.overlap_px, "input_mpp": card.input_mpp,
           "heatmap": card.heatmap.model_dump(), "tilscore": __version__}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def completed_summary(out_dir: Path, item: InputSlide, engine: Engine, stain: str,
                      cfg: ScoreConfig) -> dict | None:
    """The existing summary of `item` if its outputs are complete and were made with the
    same model and configuration (summary.json is written last, so it marks completeness)."""
    path = out_dir / item.slide_id / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same_model = summary.get("model", {}).get("sha256") == engine.card.sha256
    same_config = summary.get("config_hash") == config_hash(engine, stain, cfg)
    return summary if same_model and same_config else None


def all_summaries(out_dir: Path) -> list[dict]:
    """Every complete slide summary under `out_dir` (one per slide folder)."""
    rows = []
    for path in sorted(out_dir.glob("*/summary.json")):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            log.warning("unreadable summary %s skipped in scores.csv", path)
    return rows


def flatten(summary: dict, prefix: str = "") -> dict:
    """Scalar fields of a nested summary as a flat dict with dotted keys."""
    flat = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def score_inputs(inputs: list[str], out_dir: str | Path, stain: str = "he",
                 model: str | None = None, device: str = "auto", overwrite: bool = False,
                 cfg: ScoreConfig | None = None, **options) -> RunResult:
    """Score every input; failures are collected, not raised (UsageError still raises).

    Slides whose complete outputs exist with the same model and configuration are
    skipped (``overwrite`` redoes them). ``scores.csv`` is rebuilt from every summary in
    `out_dir`, so it has exactly one row per scored slide across runs; ``failures.csv``
    lists this run's failures.
    """
    out_dir = Path(out_dir)
    cfg = cfg or ScoreConfig()
    items = expand_inputs(inputs)
    _ensure_writable(out_dir)
    engine = Engine.load(model, stain, device)
    result = RunResult()
    try:
        for item in items:
            done = None if overwrite else completed_summary(out_dir, item, engine, stain, cfg)
            if done is not None:
                result.skipped.append(item.slide_id)
                result.rows.append(flatten(done))
                continue
            try:
                summary = score_slide(item, out_dir, engine, stain=stain, cfg=cfg, **options)
                result.rows.append(flatten(summary))
            except UsageError:
                raise
            except Exception as exc:  # one bad slide never stops the others
                log.debug("slide %s failed", item.path, exc_info=True)
                msg = (str(exc) if isinstance(exc, TilscoreError)
                       else f"{type(exc).__name__}: {exc}")
                first = msg.splitlines()[0] if msg.strip() else type(exc).__name__
                result.failures.append({"input": str(item.path), "error": first})
    finally:  # what was scored is recorded even if the run is interrupted
        rows = [flatten(s) for s in all_summaries(out_dir)]
        fields = sorted({k for row in rows for k in row}, key=_column_order)
        atomic.write_csv(out_dir / "scores.csv", fields, rows)
        atomic.write_csv(out_dir / "failures.csv", ["input", "error"], result.failures)
    return result


def _column_order(key: str) -> tuple[int, str]:
    first = ("slide", "stain", "stromal_til_percent", "til_score_tiger")
    return (first.index(key), "") if key in first else (len(first), key)


def _ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".tilscore-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output folder {out_dir} is not writable: {exc.strerror}") from exc


__all__ = ["Engine", "InputError", "RunResult", "score_inputs", "score_slide"]
