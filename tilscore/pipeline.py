"""Scoring one slide and many: open → tissue → tiles → model → stitch → score → outputs.

Library functions only (no printing); the CLI reports. Each slide's outputs are written
into a temporary folder and renamed to ``OUT/<slide_id>/`` when complete, so a crash
never leaves a half-written slide folder; a failing slide is recorded in
``failures.csv`` and never stops the others.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilscore import __version__
from tilscore.errors import InputError, UsageError
from tilscore.inputs import InputSlide, slide_id_problem
from tilscore.interrupt import deferred_signals
from tilscore.io import atomic
from tilscore.io.locks import LOCK_SUFFIX, SlideLock, locks_work
from tilscore.score import COMPARTMENT_OF_REGION, REGION_CLASSES, ScoreConfig

log = logging.getLogger(__name__)

DEFAULT_MODELS = {"he": "he-default", "cd20": "ihc-default", "foxp3": "ihc-default"}
THUMBNAIL_MPP = 8.0  # µm/px: tissue detection (and the overlay of large slides)
OVERLAY_LONG_SIDE_PX = 1536  # overlay.png is rendered at about this size


MODES = ("full", "fast")
WRITE_THREADS: int | None = None  # output files written at once (None: one per usable core)


@dataclass
class Engine:
    """What stays loaded across slides: the model, its card, the device, the predictor;
    in the fast mode also the region model's predictor (`regions`, tilscore.fast)."""

    card: object
    device: object
    predictor: object
    cores: int = 1  # CPU cores this engine may use (torch threads on CPU, tile decoding)
    regions: object = None  # Predictor of the region model (fast mode), else None

    @property
    def mode(self) -> str:
        return "full" if self.regions is None else "fast"

    @classmethod
    def load(cls, model: str | None, stain: str, device: str = "auto",
             cpu_threads: int | None = None, compile_model: bool | str = False,
             mode: str = "full", region_model: str | None = None) -> Engine:
        """`cpu_threads`: cores this engine may use (None: every usable core);
        `compile_model`: torch.compile the network and its decoding (True, or a torch.compile
        mode such as ``reduce-overhead``: CUDA graphs; see docs/benchmarks.md); `mode`:
        ``full`` or ``fast`` (H&E: `region_model` for pass 1, default he-regions)."""
        from tilscore.infer import Predictor, configure_cpu_threads, select_device, usable_cores
        from tilscore.models import load_model
        from tilscore.tissue_only import NO_MODEL, TissueOnlyNet

        dev = select_device(device)
        if dev.type == "cpu":
            configure_cpu_threads(threads=cpu_threads)
        card = model_card(model, stain)  # a clear error before any weights are read
        region_name = fast_region_model(mode, stain, region_model)
        net, card = (TissueOnlyNet(), card) if model == NO_MODEL else load_model(
            model or DEFAULT_MODELS[stain])
        regions = None
        if region_name is not None:
            rnet, rcard = load_model(region_name)
            regions = Predictor(rnet, rcard, dev, compile_model=compile_model)
        return cls(card, dev, Predictor(net, card, dev, compile_model=compile_model),
                   cpu_threads or usable_cores(), regions)


def fast_region_model(mode: str, stain: str, region_model: str | None) -> str | None:
    """The region model the fast mode runs (None in the full mode); checks the mode, the
    stain, and that the model takes H&E and has the region map's classes in order (reads
    only its card)."""
    from tilscore.fast import DEFAULT_REGION_MODEL
    from tilscore.models.registry import read_card, resolve_model_dir

    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "full":
        return None
    if stain != "he":
        raise UsageError(f"--mode fast is for H&E (stain he), not {stain!r}: on IHC every "
                         "cell is counted, so there is nothing to skip")
    name = region_model or DEFAULT_REGION_MODEL
    card = read_card(resolve_model_dir(name))
    if "he" not in card.stains:
        raise UsageError(f"region model {card.name} does not support H&E")
    if tuple(card.region_classes) != REGION_CLASSES:  # the region map's codes
        raise UsageError(f"region model {card.name}: its classes {list(card.region_classes)} "
                         f"are not {list(REGION_CLASSES)} in that order")
    return name


def model_card(model: str | None, stain: str):
    """The card of `model` (None: the stain's default; "none": no compartment model,
    :mod:`tilscore.tissue_only`), checked to support `stain`; reads only card.json, so a
    batch client can decide what to skip without weights."""
    from tilscore.models.registry import MODELS_DIR, read_card, resolve_model_dir
    from tilscore.tissue_only import NO_MODEL, tissue_only_card

    if model == NO_MODEL:
        return tissue_only_card(stain)
    name = model or DEFAULT_MODELS[stain]
    if model is None and not (MODELS_DIR / name / "card.json").exists():
        shipped = sorted(p.parent.name for p in MODELS_DIR.glob("*/card.json"))
        raise UsageError(f"no default model for stain {stain!r} is installed "
                         f"(shipped: {', '.join(shipped) or 'none'}); pass --model")
    card = read_card(resolve_model_dir(name))
    if stain not in card.stains:
        raise UsageError(f"model {card.name} does not support stain {stain!r} "
                         f"(it supports: {', '.join(card.stains)})")
    return card


def score_slide(item: InputSlide, out_dir: Path, engine: Engine, stain: str = "he",
                mpp: float | None = None, cfg: ScoreConfig | None = None,
                read_threads: int | None = None, batch_size: int | None = None,
                quiet: bool = False, decode: str = "auto",
                lock: SlideLock | None = None) -> dict:
    """Score one slide into ``out_dir/<slide_id>/`` and return its summary dict.

    `read_threads`/`batch_size` None: the device's defaults
    (:func:`tilscore.infer.default_read_threads`, :func:`~tilscore.infer.default_batch_size`);
    `decode`: where JPEG tiles are decoded (:func:`tilscore.infer.predict_slide`).

    `mpp` overrides the file's pixel size unless the input carries its own (a manifest
    row). A tile progress bar (throughput, ETA) goes to stderr when it is a terminal and
    not `quiet`. The same as :func:`start_slide` (`lock`: the slide's lock, see there)
    followed by its ``finish()``."""
    return start_slide(item, out_dir, engine, stain, mpp, cfg, read_threads, batch_size,
                       quiet, decode, lock)()


def start_slide(item: InputSlide, out_dir: Path, engine: Engine, stain: str = "he",
                mpp: float | None = None, cfg: ScoreConfig | None = None,
                read_threads: int | None = None, batch_size: int | None = None,
                quiet: bool = False, decode: str = "auto",
                lock: SlideLock | None = None) -> Callable[[], dict]:
    """The slide's pass over the device now (tissue, tiles, model, stitching; arguments
    as :func:`score_slide`); returns ``finish()``, which aggregates, writes every output,
    publishes the slide folder and returns the summary. ``finish`` reads no pixels (the
    slide is closed by then), so it can run on another thread while the next slide uses
    the device (:mod:`tilscore.batch` does). Call it exactly once: it removes the work
    folder whatever happens. If this raises, nothing is left behind.

    The slide's lock (:class:`~tilscore.io.locks.SlideLock`) is held from before the work
    folder exists until it is gone: `lock`, acquired by the caller, is taken over;
    None: taken here, and :class:`SlideBusyError` if another run holds it."""
    problem = _input_problem(item)
    if problem:
        if lock is not None:
            lock.release()
        raise InputError(problem)
    if lock is None:
        lock = SlideLock(out_dir, item.slide_id)
        if not lock.acquire():
            raise SlideBusyError(f"{item.slide_id}: another run is scoring it (it holds "
                                 f"{lock.path})")
    try:
        finish = _start_locked(item, out_dir, engine, stain, mpp, cfg, read_threads,
                               batch_size, quiet, decode)
    except BaseException:
        lock.release()
        raise

    def finish_and_release() -> dict:
        try:
            return finish()
        finally:
            lock.release()

    return finish_and_release


def _input_problem(item: InputSlide) -> str | None:
    """Why `item` cannot be scored before anything is touched (None: it can). Checks an
    InputSlide built by a caller, not by tilscore.inputs, as those do."""
    from tilscore.slide.base import mpp_problem

    problem = slide_id_problem(item.slide_id)
    if problem:  # it names the output folder and the lock file
        return f"slide id {item.slide_id!r} {problem}"
    if item.problem:
        return item.problem
    if item.mpp is not None and mpp_problem(item.mpp):  # this slide's, not a usage error
        return f"{item.path.name}: its mpp {item.mpp:g} {mpp_problem(item.mpp)}"
    return None


def _start_locked(item: InputSlide, out_dir: Path, engine: Engine, stain: str,
                  mpp: float | None, cfg: ScoreConfig | None, read_threads: int | None,
                  batch_size: int | None, quiet: bool, decode: str) -> Callable[[], dict]:
    """:func:`start_slide` once the slide's lock is held."""
    from tilscore.fast import predict_fast
    from tilscore.infer import default_batch_size, default_read_threads, predict_slide
    from tilscore.slide import open_slide
    from tilscore.tiles import TileSpec, tile_grid
    from tilscore.tissue import tissue_mask_from_thumbnail

    cfg = cfg or ScoreConfig()
    card = engine.card
    read_threads = read_threads or default_read_threads(engine.device, engine.cores)
    batch_size = batch_size or default_batch_size(engine.device)
    t0 = time.perf_counter()
    # Host and PID in the name tell a person whose it is; what makes it stale is its free
    # slide lock (remove_stale_work_dirs); mkdtemp's random suffix keeps it unique.
    prefix = f".{item.slide_id}.tmp-{atomic.host_tag()}-{os.getpid()}-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))
    try:
        with open_slide(item.path, mpp=item.mpp if item.mpp is not None else mpp) as slide:
            slide_mpp = slide.mpp  # MissingMppError here names --mpp
            thumb = slide.thumbnail(THUMBNAIL_MPP)
            mask = tissue_mask_from_thumbnail(thumb, slide.thumbnail_mpp(THUMBNAIL_MPP))
            t_tissue = time.perf_counter() - t0
            rule = _ihc_rule(stain, card, slide, thumb, mask, cfg)
            plan = None
            with _tile_bar(item.slide_id, quiet) as bar:
                if engine.regions is None:
                    spec = TileSpec(mpp=card.input_mpp, tile_px=card.tile_px,
                                    overlap_px=card.overlap_px)
                    grid = tile_grid(slide.dimensions, slide_mpp, spec, mask)
                    bar.total = len(grid)
                    pred = predict_slide(slide, grid, engine.predictor, work / ".canvas.zarr",
                                         workers=read_threads, batch_size=batch_size,
                                         tissue=mask, progress=bar.update, cell_rule=rule,
                                         decode=decode)
                else:
                    pred, plan = predict_fast(slide, mask, engine.regions, engine.predictor,
                                              work, cfg, read_threads, batch_size, bar.update,
                                              decode)
                    grid = plan.cell_grid
            overlay_mpp = _overlay_mpp(slide)
            overlay = thumb if overlay_mpp >= THUMBNAIL_MPP else slide.thumbnail(overlay_mpp)
        t_pass_end = time.perf_counter()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    def finish() -> dict:
        from tilscore.aggregate import region_summary
        from tilscore.tissue_only import NO_MODEL

        try:
            t_agg = time.perf_counter()
            t_start = t0 + (t_agg - t_pass_end)  # runtime_s leaves out any wait in a queue
            regions = region_summary(pred.canvas, cfg)
            names = rule.class_names if rule else tuple(card.cell_classes)
            cells = _cell_table(pred.cells, names, slide_mpp, regions,
                                with_compartments=card.name != NO_MODEL)
            spatial = None  # not in the fast mode (cells searched in bulk stroma only)
            if plan is None and card.name != NO_MODEL:
                from tilscore.spatial import slide_spatial

                cells["tumour_distance_um"], spatial = slide_spatial(
                    pred.canvas, cells, stain, (slide.dimensions[0] * slide_mpp,
                                                slide.dimensions[1] * slide_mpp),
                    (cfg.spatial_band_inner_um, cfg.spatial_band_outer_um))
            summary = _summary(item, stain, slide, engine, thumb, mask, grid, pred, regions,
                               cells, cfg, rule, plan)
            if spatial is not None:
                summary["spatial"] = spatial
            summary["timings_s"].update(tissue=round(t_tissue, 3),
                                        aggregate=round(time.perf_counter() - t_agg, 3))
            extent_um = (slide.dimensions[0] * slide_mpp, slide.dimensions[1] * slide_mpp)
            _write_outputs(work, summary, cells, regions, (overlay, overlay_mpp), slide_mpp,
                           extent_um, card, cfg, pred, t_start, plan)
            _publish(work, out_dir / item.slide_id)
            return summary
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return finish


def _ihc_rule(stain: str, card, slide, thumb: np.ndarray, mask, cfg: ScoreConfig):
    """The H-DAB cell rule for an IHC stain, with stain vectors estimated on this slide's
    thumbnail (None on H&E: cells come from the model's heatmaps)."""
    if stain == "he":
        return None
    from tilscore.ihc import estimate_stain_vectors
    from tilscore.ihc_cells import IhcCellRule

    downsample = card.input_mpp / slide.mpp  # level-0 px per tile px
    return IhcCellRule(stain, card.input_mpp,
                       estimate_stain_vectors(*_stain_estimation_image(slide, thumb, mask)),
                       ihc_rule_params(stain, cfg),
                       extent_px=(slide.dimensions[0] / downsample,
                                  slide.dimensions[1] / downsample))


STAIN_ESTIMATION_MIN_PX = 256 * 256  # pixels the stain-vector estimate is made on, at least


def _stain_estimation_image(slide, thumb: np.ndarray, mask) -> tuple[np.ndarray, object]:
    """(uint8 RGB, bool tissue or None) to estimate the stain vectors on: the tissue
    thumbnail and mask; for a small image (an ROI or tile, whose thumbnail has fewer than
    STAIN_ESTIMATION_MIN_PX pixels, too few for the estimate) a finer thumbnail, at most
    the slide's own resolution, without the mask (at 8 µm/px every pixel of a 0.1 mm tile
    mixes tissue and glass): as :func:`~tilscore.ihc.estimate_stain_vectors` says, glass
    then drops out by its low OD and its colour is the brightest 2 % if bright and
    neutral, which is how the IHC validation treats each labelled tile (docs/ihc.md)."""
    h, w = thumb.shape[:2]
    if h * w >= STAIN_ESTIMATION_MIN_PX:
        return thumb, mask.mask
    mpp = max(slide.mpp, THUMBNAIL_MPP * math.sqrt(h * w / STAIN_ESTIMATION_MIN_PX))
    return slide.thumbnail(mpp), None


def ihc_rule_params(stain: str, cfg: ScoreConfig):
    """The :class:`~tilscore.ihc_detect.IhcParams` an IHC stain is scored with: the
    marker's defaults with the score configuration's overrides."""
    from tilscore.ihc_detect import ihc_params

    return ihc_params(stain, **cfg.ihc_overrides(stain))


DAB_BIN_SETTINGS = ("dab_bin_weak_od", "dab_bin_moderate_od", "dab_bin_strong_od")


def score_settings_used(stain: str, cfg: ScoreConfig) -> dict:
    """The score settings a slide of `stain` is scored with, every value resolved: the
    summary's ``score_config`` (the one record of them). On IHC the marker's positive
    threshold and the intensity bins are the values the cell rule used (the marker's
    defaults where the configuration leaves them null), and so are the lymphocyte gate's
    limits; settings of other stains are left out (H&E has no DAB settings or gate, a
    FOXP3 slide no CD20 threshold)."""
    from tilscore.score import LYMPHOCYTE_GATE_KEYS, OPTIONAL_SETTINGS

    used = {k: v for k, v in cfg.__dict__.items() if k not in OPTIONAL_SETTINGS}
    if stain != "he":
        params = ihc_rule_params(stain, cfg)
        used[f"{stain}_dab_threshold_od"] = params.dab_threshold_od
        used.update(zip(DAB_BIN_SETTINGS, params.bins_od, strict=True))
        used.update({key: getattr(params.nuclei, name)
                     for key, name in LYMPHOCYTE_GATE_KEYS.items()})
    return used


def _tile_bar(slide_id: str, quiet: bool):
    """A tile progress bar (the caller sets ``total`` once the grid is known)."""
    from tqdm import tqdm

    # disable=None: shown only on a terminal, so logs and CI stay clean.
    return tqdm(desc=slide_id, unit="tile", disable=True if quiet else None,
                dynamic_ncols=True, leave=False)


def _overlay_mpp(slide) -> float:
    """µm/px giving the overlay a long side of ~OVERLAY_LONG_SIDE_PX (never finer than the
    slide, never coarser than the tissue thumbnail)."""
    long_um = max(slide.dimensions) * slide.mpp
    return float(min(THUMBNAIL_MPP, max(slide.mpp, long_um / OVERLAY_LONG_SIDE_PX)))


def _cell_table(raw: dict, class_names, slide_mpp: float, regions,
                with_compartments: bool = True) -> dict:
    """Cells on tissue with class names, µm coordinates, compartment, tumour-bulk flag
    (and any extra columns of `raw`, e.g. DAB optical density on IHC; the IHC gate code
    becomes its name). Without compartments (no compartment model) the compartment is ""
    (unknown, as the summary's nulls say), not "other"."""

    region = regions.compartment_at(raw["x_px"] * slide_mpp, raw["y_px"] * slide_mpp)
    on_tissue = region > 0
    t = {k: v[on_tissue] for k, v in raw.items()}
    t["region"] = region[on_tissue]
    names = np.array(class_names)
    comp_names = np.array(["other", *[COMPARTMENT_OF_REGION[k] for k in (1, 2, 3)]])
    x_um, y_um = t["x_px"] * slide_mpp, t["y_px"] * slide_mpp
    bi = np.clip((y_um / regions.coarse_mpp).astype(int), 0, regions.bulk.shape[0] - 1)
    bj = np.clip((x_um / regions.coarse_mpp).astype(int), 0, regions.bulk.shape[1] - 1)
    if "gate" in t:
        from tilscore.ihc_detect import GATES

        t["gate"] = np.array(GATES)[t["gate"].astype(np.int64)]
    compartment = comp_names[t["region"]] if with_compartments else np.full(len(x_um), "")
    return {
        **t, "x_um": x_um, "y_um": y_um, "class": names[t["cls"]],
        "compartment": compartment, "in_bulk": regions.bulk[bi, bj]
        if regions.bulk.size else np.zeros(len(x_um), bool),
    }


def counted_class(stain: str) -> str:
    """The cell class a stain's score counts (drawn on the overlay, mapped as density)."""
    return "lymphocyte" if stain == "he" else f"{stain}_positive"


def _summary(item, stain, slide, engine, thumb, mask, grid, pred, regions, cells, cfg,
             rule, plan=None) -> dict:
    """`plan`: the fast mode's :class:`~tilscore.fast.FastPlan` (None in the full mode):
    counts outside the compartment it searched are null, not zero. Without a compartment
    model (``--model none``) only ``tissue`` is known: the rest is null."""
    from tilscore.score import counts_by_compartment, densities
    from tilscore.tissue_only import NO_MODEL

    card = engine.card
    areas = regions.areas
    names = list(rule.class_names if rule else card.cell_classes)
    counts = counts_by_compartment(names, cells["cls"], cells["compartment"],
                                   cells["in_bulk"])
    no_model = card.name == NO_MODEL
    known = None  # the compartments whose counts are known (None: all)
    if plan is not None:
        from tilscore.fast import COUNTED_COMPARTMENT

        known = COUNTED_COMPARTMENT
    elif no_model:
        known = "tissue"
    if known is not None:
        counts = {k: {c: (n if c == known else None) for c, n in row.items()}
                  for k, row in counts.items()}
    area_values = areas.as_dict()
    if no_model:
        area_values = {c: (a if c == "tissue" else None) for c, a in area_values.items()}
    scores = (_he_scores(cells, regions, areas, cfg, plan is None, card.nucleus_mask)
              if rule is None
              else _ihc_scores(cells, counts, stain, rule))
    qc = _qc(stain, slide, thumb, mask, pred, grid, rule, scores, cells)
    fast = {} if plan is None else {"fast": plan.as_dict(engine.regions.card)}
    return {
        "slide": item.slide_id,
        "path": str(item.path),
        "stain": stain,
        "mpp": slide.mpp,
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
        "mode": engine.mode,
        **fast,
        "tilscore_version": __version__,
        "config_hash": config_hash(engine.card, stain, cfg, _region_card(engine)),
        "command": " ".join(sys.argv),
        "device": str(engine.device),
        "precision": "bfloat16" if engine.predictor.use_bf16 else "float32",
        "areas_mm2": area_values,
        "counts": counts,
        "densities_per_mm2": densities(counts, areas),
        **scores,
        "qc": qc,
        "warnings": (_warnings(areas, pred, stain, no_model)
                     + [f["message"] for f in qc["flags"] if f["code"] == "no_dab"]
                     + _mpp_warnings(slide)),
        "timings_s": {k: round(v, 3) for k, v in pred.timings_s.items()},
        "score_config": score_settings_used(stain, cfg),
        "metadata": dict(item.metadata),  # pass-through manifest columns
    }


def _region_card(engine):
    return None if engine.regions is None else engine.regions.card


def _he_scores(cells, regions, areas, cfg, all_stroma: bool = True,
               nuclei_segmented: bool = True) -> dict:
    """Stromal TIL % (ITWG and TIGER) with their parts, and lymphocytes near tumour
    (None unless `all_stroma`: the fast mode looks only in the bulk's stroma).
    `nuclei_segmented`: the cell model has a nucleus channel (else no segmented sTIL)."""
    from tilscore.score import fraction_near, stromal_tils

    stromal = (cells["class"] == "lymphocyte") & (cells["compartment"] == "stroma")
    n_bulk_stroma = int((stromal & cells["in_bulk"]).sum())
    pts = np.stack([cells["x_um"], cells["y_um"]], axis=1)
    near = (fraction_near(pts[stromal], regions.tumour, regions.coarse_mpp,
                          cfg.near_tumour_um) if all_stroma else None)
    return {**stromal_tils(n_bulk_stroma, areas, cfg, nuclei_segmented),
            "stromal_lymphocytes_near_tumour_fraction": near,
            "near_tumour_um": cfg.near_tumour_um}


def _ihc_scores(cells, counts: dict, stain: str, rule) -> dict:
    """Percent positive (of detected cells, per compartment), DAB intensity bins and the
    rule that called a cell positive."""
    from tilscore.ihc_cells import INTENSITY_BINS
    from tilscore.ihc_detect import GATES, ihc_params

    params = rule.params or ihc_params(stain)

    pos, neg = counts[f"{stain}_positive"], counts["negative"]
    percent = {k: (100.0 * pos[k] / (pos[k] + neg[k])
                   if pos[k] is not None and pos[k] + neg[k] else None) for k in pos}
    bins = np.bincount(cells["intensity_bin"].astype(np.int64), minlength=4)[:4] \
        if len(cells["cls"]) else np.zeros(4, np.int64)
    n = int(bins.sum())
    return {
        "percent_positive": percent["tissue"],
        "percent_positive_by_compartment": percent,
        "intensity_bins": dict(zip(INTENSITY_BINS, map(int, bins), strict=True)),
        # QuPath-style H-score (0–300) over every detected cell, from the DAB bins
        "h_score": float((bins * np.arange(4)).sum() * 100 / n) if n else None,
        # the threshold, bins and gate limits it used are in score_config
        # (score_settings_used); where the marker's DAB must lie:
        "positive_rule": {"compartment": params.compartment,
                          "marker_location": _marker_location(params)},
        # why cells are negative besides their DAB (cells.csv `gate`), over all tissue
        "gate_counts": {name: int((cells["gate"] == name).sum()) for name in GATES}
        if "gate" in cells else None,
    }


def _marker_location(params) -> dict:
    """The marker-location rule of IHC `params` (docs/ihc.md)."""
    if params.compartment == "nucleus":
        return {"dab_blob_closed_within_um": params.blob_window_um}
    return {"min_haematoxylin_fraction": params.min_haematoxylin_fraction,
            "max_diameter_um": params.nuclei.max_diameter_um + 2 * params.stained_rim_um}


def _qc(stain, slide, thumb, mask, pred, grid, rule=None, scores=None, cells=None) -> dict:
    """QC numbers measured while scoring, and the flags they raise (tilscore.qc)."""
    from tilscore.qc import focus_threshold, out_of_focus_fraction, qc_flags, tissue_od_percentiles

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
        "od_percentiles": tissue_od_percentiles(thumb, mask.mask),
        "region_uncertain_fraction": pred.region_uncertain_fraction,
    }
    if rule is None and cells is not None:  # H&E: do tumour-class cells sit in tumour?
        tumour_cells = cells["class"] == "tumour"
        qc["tumour_cells"] = int(tumour_cells.sum())
        qc["tumour_cells_in_tumour_fraction"] = (
            float((cells["compartment"][tumour_cells] == "tumour").mean())
            if tumour_cells.any() else None)
    if rule is not None:
        sv = rule.stain
        qc["stain_vectors"] = {"source": sv.source, "fallback": sv.fallback,
                               "reason": sv.reason,
                               "angle_deg": sv.angle_deg,
                               "haematoxylin": sv.matrix[0].tolist(),
                               "dab": sv.matrix[1].tolist(),
                               "background_rgb": list(sv.background_rgb)}
        qc["dab_positive_percent"] = scores["percent_positive"]
    qc["flags"] = qc_flags(qc, stain)
    return qc


def _mpp_warnings(slide) -> list[str]:
    """--mpp overrides the file; say so when the two disagree (a folder of mixed inputs)."""
    meta = slide.metadata_mpp
    if slide.mpp_source == "override" and meta and abs(slide.mpp / meta - 1) > 0.05:
        return [f"--mpp {slide.mpp:g} overrides the file's {meta:g} µm/px: areas and "
                "densities use the override"]
    return []


def _warnings(areas, pred, stain: str, no_compartments: bool = False) -> list[str]:
    """Plain-language problems a reader of the numbers must know about."""
    out = []
    if len(pred.cells["x_px"]) == 0 and pred.tiles == 0:
        out.append("no tissue detected: all areas and counts are zero")
    elif no_compartments:
        out.append("no compartment model (--model none): densities over all tissue only; "
                   "tumour and stroma are not separated")
    elif areas.tumour == 0:
        out.append("no invasive tumour found: " + ("stromal TIL % is undefined" if stain == "he"
                                                   else "tumour densities are undefined"))
    elif areas.stroma_in_bulk == 0 and stain == "he":
        out.append("no stroma inside the tumour bulk: stromal TIL % is undefined")
    if pred.failed_tiles:
        out.append(f"{pred.failed_tiles} tiles failed to decode and were skipped")
    return out


def _write_outputs(work: Path, summary, cells, regions, overlay, slide_mpp, extent_um,
                   card, cfg, pred, t0: float, plan=None) -> None:
    """Every output; summary.json last (it marks completeness), with the time spent
    writing the others and the slide's runtime since `t0` (perf_counter). The maps cover
    the slide's extent (w, h) in µm, `extent_um`; in the fast mode (`plan`) the density
    map is NaN where no cells were searched."""
    t_write = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    from tilscore.infer import usable_cores
    from tilscore.io.cells import write_cells_csv
    from tilscore.io.colors import CLASS_COLORS
    from tilscore.io.geojson import write_cells_geojson, write_regions_geojson
    from tilscore.io.ome_zarr import write_ome_zarr
    from tilscore.io.overlay import write_overlay_png
    from tilscore.score import COMPARTMENT_OF_REGION as region_names

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
        dmap = _density(pred.canvas, pts[mine], extent_um, cfg.density_grid_um)
        if plan is not None:
            from tilscore.fast import mask_unsearched

            dmap = mask_unsearched(dmap, plan.cell_grid, cfg.density_grid_um)
        density_name = "til_density" if stain == "he" else f"{counted}_density"
        write_ome_zarr(work / "maps.zarr", pred.canvas.labels_within(extent_um),
                       pred.canvas.mpp, dmap, cfg.density_grid_um, region_names, CLASS_COLORS,
                       density_name=density_name, density_unit=f"{counted} cells per mm²")

    # Independent files, written at once: numpy, zlib, PIL and zarr release the GIL for
    # most of their work (on a GPU node's spare cores this is ~ the slowest writer).
    jobs = [
        lambda: write_cells_csv(work / "cells.csv", cells, extra=extra),
        lambda: write_cells_geojson(work / "cells.geojson", geo_cells, radius_px, CLASS_COLORS,
                                    geo_measurements, geo_properties),
        # the region map the summary's areas count, clipped to the image
        lambda: write_regions_geojson(work / "regions.geojson",
                                      pred.canvas.labels_within(extent_um),
                                      pred.canvas.mpp / slide_mpp, region_names, CLASS_COLORS,
                                      mpp_l0=slide_mpp, image_size_l0=image_size_l0),
        maps,
        lambda: write_overlay_png(
            work / "overlay.png", overlay[0], overlay[1], regions.labels, regions.coarse_mpp,
            pts[mine], {n: CLASS_COLORS[n] for n in (*tinted.values(), counted)},
            _overlay_title(summary), class_names=tinted),
    ]
    threads = min(len(jobs), WRITE_THREADS or usable_cores())
    with ThreadPoolExecutor(threads, thread_name_prefix="write") as pool:
        for fut in [pool.submit(job) for job in jobs]:
            fut.result()  # the first error is raised, once the others have finished
    shutil.rmtree(work / ".canvas.zarr", ignore_errors=True)  # the working canvas (read above)
    now = time.perf_counter()
    summary["timings_s"]["write"] = round(now - t_write, 3)
    summary["runtime_s"] = round(now - t0, 3)
    from tilscore.summary import check_summary

    # what every reader checks (tilscore.summary): a mismatch fails this slide now
    atomic.write_json(work / "summary.json", check_summary(_jsonable(summary)))


def _density(canvas, points_xy_um: np.ndarray, extent_um, grid_um: float) -> np.ndarray:
    """The density map: points per mm² of the tissue in each grid cell of the region map
    (NaN where a cell holds none; :func:`tilscore.score.density_map`)."""
    from tilscore.aggregate import tissue_area_grid
    from tilscore.score import density_map

    tissue = tissue_area_grid(canvas.labels_within(extent_um), canvas.mpp, grid_um, extent_um)
    return density_map(points_xy_um, tissue, grid_um)


def _ihc_columns(cells: dict) -> tuple[str, ...]:
    """The IHC measurement columns present in `cells` (none on H&E), in cells.csv order."""
    from tilscore.ihc_cells import MEASUREMENTS

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


def _geojson_cells(cells: dict, stain: str) -> tuple[dict, dict | None, dict | None]:
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


PUBLISH_ATTEMPTS = 5


def _publish(work: Path, final: Path) -> None:
    """Replace `final` by the complete `work` folder (old outputs removed only after).

    Refuses any `final` that is not a direct child of the work folder's parent (the
    output folder), whatever the slide id: nothing outside ``--out`` is ever replaced."""
    out_dir = work.parent.resolve()
    if final.resolve().parent != out_dir or final.name in ("", ".", ".."):
        raise InputError(f"refusing to write outputs to {final}: not a folder directly "
                         f"inside {out_dir}")
    os.chmod(work, 0o777 & ~atomic.UMASK)  # mkdtemp makes 0700; outputs are shared
    # The slide's lock keeps other tilscore runs out; should another process publish the
    # same slide anyway (a filesystem whose locks do not reach other hosts), the
    # moved-aside folder or the target may change between the two renames: try again
    # rather than fail (both results are complete).
    with deferred_signals():  # a stop signal waits for both renames
        replaced = _swap_in(work, final)
    for old in replaced:
        shutil.rmtree(old, ignore_errors=True)


def _swap_in(work: Path, final: Path) -> list[Path]:
    """Rename `work` to `final`, moving what is there aside first; returns the folders
    moved aside (to be removed)."""
    replaced = []
    for attempt in range(PUBLISH_ATTEMPTS):
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.replace(final, old)
            replaced.append(old)
        except FileNotFoundError:
            pass  # nothing there (yet)
        try:
            os.replace(work, final)
            break
        except OSError as exc:  # ENOTEMPTY/EEXIST: someone published in between
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or \
                    attempt == PUBLISH_ATTEMPTS - 1:
                raise
    return replaced


def config_hash(card, stain: str, cfg: ScoreConfig, region_card=None) -> str:
    """Short hash of everything that changes a slide's numbers besides the slide itself
    (the model is identified separately by its sha256); `region_card`: the fast mode's
    region model (None: the full mode)."""
    key = {"stain": stain, "score": cfg.__dict__, "tile_px": card.tile_px,
           "overlap_px": card.overlap_px, "input_mpp": card.input_mpp,
           "heatmap": card.heatmap.model_dump(), "tilscore": __version__}
    if region_card is not None:
        key["fast"] = {"region_model": region_card.sha256}
    if stain != "he":  # the IHC cell rule's constants change the counts too
        from dataclasses import asdict

        key["ihc"] = asdict(ihc_rule_params(stain, cfg))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


STALE_AGE_S = 24 * 3600  # far beyond any slide's runtime
# work folders (.<id>.tmp-<host>-<pid>-<random>) and replaced outputs (.<id>.old-<hex>)
_LEFT_BEHIND = re.compile(r"\.(?P<id>.+)\.(tmp-(?P<host>[A-Za-z0-9]+)-|old-)[^/]+")


def remove_stale_work_dirs(out_dir: Path) -> list[Path]:
    """Delete the work folders (and replaced outputs, ``.<id>.old-*``) left in `out_dir`
    by runs that are gone, and their lock files; return the folders removed.

    A folder is stale when its slide's lock can be taken: the run that made it held the
    lock for as long as the folder was its own, and the OS released it when that run
    died (:mod:`tilscore.io.locks`), so nothing of a live run is touched, whatever its
    PID namespace. A work folder named for another host is removed only once older than
    STALE_AGE_S as well (not every shared filesystem carries locks between hosts), and
    where the filesystem has no working locks at all, that age is the only rule."""
    removed = []
    locking = locks_work(out_dir)
    for path in sorted(out_dir.glob(".*")):
        match = _LEFT_BEHIND.fullmatch(path.name)
        if path.is_file() and path.name.endswith(LOCK_SUFFIX) and locking:
            lock = SlideLock(out_dir, path.name[1:-len(LOCK_SUFFIX)])
            if lock.acquire():  # a killed run's lock file: releasing unlinks it
                lock.release()
            continue
        if match is None or not path.is_dir():
            continue
        try:
            old_enough = time.time() - path.stat().st_mtime > STALE_AGE_S
        except FileNotFoundError:
            continue  # its run just finished with it
        if not locking or match["host"] not in (None, atomic.host_tag()):
            if not old_enough:
                continue
        with SlideLock(out_dir, match["id"]) as lock:
            if not lock.acquire():
                continue  # a live run owns it
            shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class SlideBusyError(InputError):
    """Another live run holds the slide's lock (it is scoring the slide now)."""


__all__ = ["Engine", "InputError", "SlideBusyError", "config_hash", "score_slide",
           "start_slide"]
