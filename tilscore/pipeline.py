"""One slide, orchestrated: open → tissue → tiles → model → stitch (the device pass), then
aggregate → score → outputs → publish.

Library functions only (no printing); the CLI reports. The stages live in their modules:
the engine (:mod:`tilscore.engine_load`), the score (:mod:`tilscore.slide_score`), the
files (:mod:`tilscore.outputs`) and the work folder and publishing
(:mod:`tilscore.io.publish`): each slide's outputs are written into a temporary folder
and renamed to ``OUT/<slide_id>/`` when complete, under the slide's lock, so a crash
never leaves a half-written slide folder.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tilscore.engine.defaults import DEFAULT_DECODE
from tilscore.engine.fast import COUNTED_COMPARTMENT, predict_fast
from tilscore.engine.infer import default_batch_size, default_read_threads, predict_slide
from tilscore.engine.load import Engine, config_hash
from tilscore.errors import InputError
from tilscore.inputs import InputSlide, slide_id_problem
from tilscore.io.locks import SlideLock
from tilscore.io.publish import make_work_dir, publish, remove_stale_work_dirs
from tilscore.outputs import summary_record, write_outputs
from tilscore.prepare.tiles import TileSpec, prepare_slide
from tilscore.prepare.tissue import COARSE_MPP
from tilscore.scoring.aggregate import region_summary
from tilscore.scoring.ihc import estimate_stain_vectors
from tilscore.scoring.ihc_cells import IhcCellRule
from tilscore.scoring.score import ScoreConfig
from tilscore.scoring.slide_score import QcInputs, cell_table, ihc_rule_params, slide_score
from tilscore.scoring.spatial import slide_spatial
from tilscore.scoring.tissue_only import NO_MODEL
from tilscore.slide import open_slide
from tilscore.slide.base import mpp_problem

OVERLAY_LONG_SIDE_PX = 1536  # overlay.png is rendered at about this size


def score_slide(item: InputSlide, out_dir: Path, *, engine: Engine, stain: str = "he",
                mpp: float | None = None, cfg: ScoreConfig | None = None,
                read_threads: int | None = None, batch_size: int | None = None,
                quiet: bool = False, decode: str = DEFAULT_DECODE,
                lock: SlideLock | None = None, command: str | None = None) -> dict:
    """Score one slide into ``out_dir/<slide_id>/`` and return its summary dict.

    `read_threads`/`batch_size` None: the device's defaults
    (:func:`tilscore.infer.default_read_threads`, :func:`~tilscore.infer.default_batch_size`);
    `decode`: where JPEG tiles are decoded (:func:`tilscore.infer.predict_slide`);
    `command`: the command line to record in the summary (None: not run from one).

    `mpp` overrides the file's pixel size unless the input carries its own (a manifest
    row). A tile progress bar (throughput, ETA) goes to stderr when it is a terminal and
    not `quiet`. The same as :func:`start_slide` (`lock`: the slide's lock, see there)
    followed by its ``finish()``."""
    return start_slide(item, out_dir, engine=engine, stain=stain, mpp=mpp, cfg=cfg,
                       read_threads=read_threads, batch_size=batch_size, quiet=quiet,
                       decode=decode, lock=lock, command=command)()


def start_slide(item: InputSlide, out_dir: Path, *, engine: Engine, stain: str = "he",
                mpp: float | None = None, cfg: ScoreConfig | None = None,
                read_threads: int | None = None, batch_size: int | None = None,
                quiet: bool = False, decode: str = DEFAULT_DECODE,
                lock: SlideLock | None = None, command: str | None = None
                ) -> Callable[[], dict]:
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
        finish = _start_locked(item, out_dir, engine=engine, stain=stain, mpp=mpp,
                               cfg=cfg or ScoreConfig(), read_threads=read_threads,
                               batch_size=batch_size, quiet=quiet, decode=decode,
                               command=command)
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
    problem = slide_id_problem(item.slide_id)
    if problem:  # it names the output folder and the lock file
        return f"slide id {item.slide_id!r} {problem}"
    if item.problem:
        return item.problem
    if item.mpp is not None and mpp_problem(item.mpp):  # this slide's, not a usage error
        return f"{item.path.name}: its mpp {item.mpp:g} {mpp_problem(item.mpp)}"
    return None


def _start_locked(item: InputSlide, out_dir: Path, *, engine: Engine, stain: str,
                  mpp: float | None, cfg: ScoreConfig, read_threads: int | None,
                  batch_size: int | None, quiet: bool, decode: str,
                  command: str | None) -> Callable[[], dict]:
    """:func:`start_slide` once the slide's lock is held."""
    card = engine.card
    read_threads = read_threads or default_read_threads(engine.device, engine.cores)
    batch_size = batch_size or default_batch_size(engine.device)
    t0 = time.perf_counter()
    work = make_work_dir(out_dir, item.slide_id)
    try:
        with open_slide(item.path, mpp=item.mpp if item.mpp is not None else mpp) as slide:
            slide_mpp = slide.mpp  # MissingMppError here names --mpp
            prepared = prepare_slide(slide, card)
            thumb, mask, grid = prepared.thumbnail, prepared.mask, prepared.grid
            t_tissue = time.perf_counter() - t0
            rule = _ihc_rule(stain, card, slide, thumb, mask, cfg)
            plan = None
            with _tile_bar(item.slide_id, quiet) as bar:
                if engine.regions is None:
                    bar.total = len(grid)
                    pred = predict_slide(slide, grid, predictor=engine.predictor,
                                         store_path=work / ".canvas.zarr",
                                         workers=read_threads, batch_size=batch_size,
                                         tissue=mask, progress=bar.update, cell_rule=rule,
                                         decode=decode)
                else:
                    pred, plan = predict_fast(slide, mask, regions=engine.regions,
                                              cells=engine.predictor, work=work, cfg=cfg,
                                              workers=read_threads, batch_size=batch_size,
                                              progress=bar.update, decode=decode)
                    grid = plan.cell_grid
            overlay_mpp = _overlay_mpp(slide)
            overlay = thumb if overlay_mpp >= COARSE_MPP else slide.thumbnail(overlay_mpp)
            extent_um = (slide.dimensions[0] * slide_mpp, slide.dimensions[1] * slide_mpp)
            measured = QcInputs(mask=mask, thumbnail=thumb, mpp_source=slide.mpp_source,
                                tiles=pred.tiles, failed_tiles=pred.failed_tiles,
                                focus=pred.focus, tile_tissue_fraction=grid.tissue_fraction,
                                region_uncertain_fraction=pred.region_uncertain_fraction)
            mpp_warnings = _mpp_warnings(slide)
        t_pass_end = time.perf_counter()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    def finish() -> dict:
        try:
            t_agg = time.perf_counter()
            t_start = t0 + (t_agg - t_pass_end)  # runtime_s leaves out any wait in a queue
            regions = region_summary(pred.canvas, cfg)
            no_model = card.name == NO_MODEL
            names = rule.class_names if rule else tuple(card.cell_classes)
            cells = cell_table(pred.cells, names, slide_mpp=slide_mpp, regions=regions,
                               with_compartments=not no_model)
            spatial = None  # not in the fast mode (cells searched in bulk stroma only)
            if plan is None and not no_model:
                cells["tumour_distance_um"], spatial = slide_spatial(
                    pred.canvas, cells, stain=stain,
                    extent_um=(slide.dimensions[0] * slide_mpp, slide.dimensions[1] * slide_mpp),
                    edges_um=(cfg.spatial_band_inner_um, cfg.spatial_band_outer_um))
            score = slide_score(
                cells, regions, measured=measured, stain=stain, class_names=names, cfg=cfg,
                ihc_params=None if rule is None else rule.params,
                stain_vectors=None if rule is None else rule.stain,
                counted_compartment=(COUNTED_COMPARTMENT if plan is not None
                                     else "tissue" if no_model else None),
                all_stroma=plan is None, no_compartments=no_model,
                nuclei_segmented=card.nucleus_mask, extra_warnings=mpp_warnings)
            summary = summary_record(item, score, engine=engine, cfg=cfg, slide_mpp=slide_mpp,
                                     prediction=pred, plan=plan, command=command)
            if spatial is not None:
                summary["spatial"] = spatial
            summary["timings_s"].update(tissue=round(t_tissue, 3),
                                        aggregate=round(time.perf_counter() - t_agg, 3))
            write_outputs(work, summary, cells=cells, regions=regions,
                          overlay=(overlay, overlay_mpp), slide_mpp=slide_mpp,
                          extent_um=extent_um, cfg=cfg, canvas=pred.canvas, t0=t_start,
                          plan=plan)
            publish(work, out_dir / item.slide_id)
            return summary
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return finish


def _ihc_rule(stain: str, card, slide, thumb: np.ndarray, mask, cfg: ScoreConfig):
    """The H-DAB cell rule for an IHC stain, with stain vectors estimated on this slide's
    thumbnail (None on H&E: cells come from the model's heatmaps)."""
    if stain == "he":
        return None
    downsample = TileSpec.from_card(card).downsample(slide.mpp)  # level-0 px per tile px
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
    mpp = max(slide.mpp, COARSE_MPP * math.sqrt(h * w / STAIN_ESTIMATION_MIN_PX))
    return slide.thumbnail(mpp), None


def _tile_bar(slide_id: str, quiet: bool):
    """A tile progress bar (the caller sets ``total`` once the grid is known)."""
    # disable=None: shown only on a terminal, so logs and CI stay clean.
    return tqdm(desc=slide_id, unit="tile", disable=True if quiet else None,
                dynamic_ncols=True, leave=False)


def _overlay_mpp(slide) -> float:
    """µm/px giving the overlay a long side of ~OVERLAY_LONG_SIDE_PX (never finer than the
    slide, never coarser than the tissue thumbnail)."""
    long_um = max(slide.dimensions) * slide.mpp
    return float(min(COARSE_MPP, max(slide.mpp, long_um / OVERLAY_LONG_SIDE_PX)))


def _mpp_warnings(slide) -> list[str]:
    """--mpp overrides the file; say so when the two disagree (a folder of mixed inputs)."""
    meta = slide.metadata_mpp
    if slide.mpp_source == "override" and meta and abs(slide.mpp / meta - 1) > 0.05:
        return [f"--mpp {slide.mpp:g} overrides the file's {meta:g} µm/px: areas and "
                "densities use the override"]
    return []


class SlideBusyError(InputError):
    """Another live run holds the slide's lock (it is scoring the slide now)."""


# Engine and config_hash are part of this module's API (scoring one slide needs an
# Engine); remove_stale_work_dirs is what a batch calls before its slides.
__all__ = ["Engine", "InputError", "SlideBusyError", "config_hash", "remove_stale_work_dirs",
           "score_slide", "start_slide"]
