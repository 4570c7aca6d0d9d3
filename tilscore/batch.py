"""Many slides: inputs → (skip | score | fail) per slide, in this process or on workers.

Slide-level parallelism only (a slide is the unit of work and of failure): in-process
(one device), a Dask LocalCluster of worker processes (one per GPU, or N on CPU), an
existing Dask scheduler, or a Slurm cluster via dask-jobqueue. Workers write each slide
into the shared output folder atomically (pipeline.score_slide); the client collects the
rows and rebuilds ``scores.csv`` from every summary, so it has one row per slide across
runs. A failing slide is recorded in ``failures.csv`` and never stops the others
(``fail_fast`` stops at the first).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from tilscore.errors import TilscoreError, UsageError
from tilscore.inputs import InputSlide, check_stain, expand_inputs
from tilscore.io import atomic
from tilscore.score import ScoreConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOptions:
    """How to run a batch. `devices`: one entry per worker process when >1 (e.g.
    ``("cuda:0", "cuda:1")``); `cluster`: None (in this process, or a LocalCluster when
    there are several devices or `workers` > 1), ``"local"``, ``"tcp://HOST:PORT"`` or
    ``"slurm"``; `cluster_config`: YAML values for Slurm (cores, memory, GPUs, ...)."""

    stain: str = "he"
    model: str | None = None
    device: str = "auto"
    devices: tuple[str, ...] = ()
    cfg: ScoreConfig = field(default_factory=ScoreConfig)
    mpp: float | None = None
    overwrite: bool = False
    fail_fast: bool = False
    quiet: bool = False
    read_threads: int | None = None  # None: the device's default (infer.default_read_threads)
    batch_size: int | None = None  # None: the device's default (infer.default_batch_size)
    compile: bool | str = False  # torch.compile the network (a str: its mode)
    decode: str = "auto"  # JPEG tiles decoded on the device (auto: on CUDA) or the host
    mode: str = "full"  # "fast" (H&E): regions at 2 µm/px everywhere, cells in bulk stroma
    region_model: str | None = None  # the fast mode's region model (None: he-regions)
    cluster: str | None = None
    workers: int = 1
    cluster_config: Path | None = None
    report: bool = True  # write or refresh OUT/report.html at the end
    # Finish (aggregate, write) slide N-1 on a thread while slide N uses the device. None:
    # on CUDA only (a CPU's cores are all busy with the model: measured no gain on 2 cores)
    overlap_writes: bool | None = None


@dataclass
class RunResult:
    """This run's rows (scored or skipped), failures, and ids skipped as already done."""

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    scored: list[str] = field(default_factory=list)


def score_inputs(inputs: list[str], out_dir: str | Path, opts: BatchOptions | None = None,
                 **overrides) -> RunResult:
    """Score every input; failures are collected, not raised (UsageError still raises).

    Slides whose complete outputs exist with the same model and configuration are
    skipped (``overwrite`` redoes them). Keyword `overrides` replace fields of `opts`.
    """
    opts = replace(opts or BatchOptions(), **overrides)
    from tilscore.infer import DECODE_MODES

    if opts.decode not in DECODE_MODES:  # before any slide is touched
        raise UsageError(f"unknown decode {opts.decode!r}; valid: {', '.join(DECODE_MODES)}")
    if opts.mpp is not None:  # before any slide: the option is wrong for all of them
        from tilscore.slide.base import validate_mpp

        validate_mpp(opts.mpp, "--mpp")
    out_dir = Path(out_dir)
    check_stain(opts.stain)
    expanded = expand_inputs(inputs)
    items = [replace(i, stain=i.stain or opts.stain) for i in expanded if not i.problem]
    _ensure_writable(out_dir)
    from tilscore.pipeline import remove_stale_work_dirs

    for path in remove_stale_work_dirs(out_dir):
        log.info("removed %s, left by a killed run", path.name)
    result = RunResult()
    for bad in (i for i in expanded if i.problem):  # this input's failure, not the batch's
        result.failures.append({"input": str(bad.path), "error": bad.problem})
        log.warning("%s: failed: %s", bad.slide_id or bad.path.name, bad.problem)
    hashes = {s: _model_and_config(opts, s) for s in sorted({i.stain for i in items})}
    todo = []
    for item in items:
        done = None if opts.overwrite else completed_summary(out_dir, item, *hashes[item.stain])
        if done is None:
            todo.append(item)
        else:
            result.skipped.append(item.slide_id)
            result.rows.append(flatten(done))
            log.info("%s: already scored (skipped)", item.slide_id)
    try:
        devices = resolve_devices(opts)
        if opts.cluster is None and len(devices) == 1 and opts.workers == 1:
            _run_here(todo, out_dir, replace(opts, device=devices[0]), result)
        else:
            _run_on_cluster(todo, out_dir, opts, devices, result)
    finally:  # what was scored is recorded even if the run is interrupted
        write_tables(out_dir, result.failures)
    if opts.report and (result.rows or result.failures):
        _refresh_report(out_dir)
    return result


def _refresh_report(out_dir: Path) -> None:
    """The cohort report is a convenience: its failure never fails the batch."""
    from tilscore.report import write_report

    try:
        write_report(out_dir)
    except Exception as exc:  # reported; the scores stand
        log.warning("report.html not written: %s", one_line(exc))


def _run_here(items: list[InputSlide], out_dir: Path, opts: BatchOptions,
              result: RunResult) -> None:
    """Score `items` in this process, one device. With ``opts.overlap_writes`` (default:
    on CUDA) pipelined by one slide: while slide N uses the device, slide N-1 is
    aggregated and written on a background thread (:func:`tilscore.pipeline.start_slide`),
    so writing is off the device's critical path; at most one slide waits to be
    finished."""
    from concurrent.futures import ThreadPoolExecutor

    engines: dict[str, object] = {}
    pending = None  # the previous slide's finish, running
    with _slide_bar(len(items), opts.quiet) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:
        for item in items:
            if item.stain not in engines:  # UsageError (no model for the stain) raises
                engines[item.stain] = load_engine(opts, item.stain, opts.device)
            started = _start_one(item, out_dir, engines[item.stain], opts)
            if pending is not None:
                _collect(pending.result(), result, bar)
                pending = None
            if not callable(started):  # failed on the device pass
                _collect(started, result, bar)
            elif _overlaps(opts, engines[item.stain]):
                pending = finisher.submit(_finish_one, item, started)
            else:
                _collect(_finish_one(item, started), result, bar)
            if opts.fail_fast and result.failures:
                break
        if pending is not None:
            _collect(pending.result(), result, bar)


def _overlaps(opts: BatchOptions, engine) -> bool:
    if opts.overlap_writes is not None:
        return opts.overlap_writes
    return engine.device.type == "cuda"


def load_engine(opts: BatchOptions, stain: str, device: str, cpu_threads: int | None = None):
    """The :class:`~tilscore.pipeline.Engine` `opts` asks for, for `stain` on `device`."""
    from tilscore.pipeline import Engine

    return Engine.load(opts.model, stain, device, cpu_threads=cpu_threads,
                       compile_model=opts.compile, mode=opts.mode,
                       region_model=opts.region_model)


def _slide_kwargs(item: InputSlide, opts: BatchOptions) -> dict:
    return dict(stain=item.stain, mpp=opts.mpp, cfg=opts.cfg, read_threads=opts.read_threads,
                batch_size=opts.batch_size, quiet=opts.quiet, decode=opts.decode)


def _score_one(item: InputSlide, out_dir: Path, engine, opts: BatchOptions) -> dict:
    """Score one slide; a slide's failure is returned as data, never raised."""
    from tilscore.pipeline import score_slide

    return _finish_one(item, lambda: score_slide(item, out_dir, engine,
                                                 **_slide_kwargs(item, opts)))


def _start_one(item: InputSlide, out_dir: Path, engine, opts: BatchOptions):
    """The slide's device pass: its ``finish`` callable, or its failure as data."""
    from tilscore.pipeline import start_slide

    try:
        return start_slide(item, out_dir, engine, **_slide_kwargs(item, opts))
    except UsageError:
        raise
    except Exception as exc:  # one bad slide never stops the others
        return _failure(item, exc)


def _finish_one(item: InputSlide, finish) -> dict:
    """Run `finish` (returns the summary): the slide's row, or its failure as data."""
    try:
        return {"slide_id": item.slide_id, "row": flatten(finish())}
    except UsageError:
        raise
    except Exception as exc:  # one bad slide never stops the others
        return _failure(item, exc)


def _failure(item: InputSlide, exc: Exception) -> dict:
    log.debug("slide %s failed", item.path, exc_info=True)
    return {"slide_id": item.slide_id, "input": str(item.path), "error": one_line(exc)}


def one_line(exc: BaseException) -> str:
    msg = str(exc) if isinstance(exc, TilscoreError) else f"{type(exc).__name__}: {exc}"
    return msg.splitlines()[0] if msg.strip() else type(exc).__name__


def _collect(outcome: dict, result: RunResult, bar) -> None:
    if "row" in outcome:
        result.rows.append(outcome["row"])
        result.scored.append(outcome["slide_id"])
        log.info("%s: scored in %.1f s", outcome["slide_id"], outcome["row"].get("runtime_s", 0))
    else:
        result.failures.append({"input": outcome["input"], "error": outcome["error"]})
        log.warning("%s: failed: %s", outcome["slide_id"], outcome["error"])
    bar.update(1)
    bar.set_postfix(failed=len(result.failures), refresh=False)


def _slide_bar(total: int, quiet: bool):
    from tqdm import tqdm

    # disable=None: shown only on a terminal, so logs and CI stay clean.
    return tqdm(total=total, desc="slides", unit="slide", disable=True if quiet else None,
                dynamic_ncols=True, position=0)


# -- devices and clusters ---------------------------------------------------------------

def resolve_devices(opts: BatchOptions) -> list[str]:
    """One device per worker process: `opts.devices` when given (``("all",)`` = every
    visible GPU); otherwise every GPU when the device is auto and there are several,
    else ``[opts.device]``."""
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = list(opts.devices)
    if devices == ["all"] or (not devices and opts.device == "auto" and n_gpus > 1
                              and opts.cluster is None and opts.workers == 1):
        if devices and n_gpus == 0:
            raise UsageError("--devices all: no CUDA GPU is visible")
        devices = [f"cuda:{k}" for k in range(n_gpus)] or [opts.device]
    return devices or [opts.device]


def _run_on_cluster(items: list[InputSlide], out_dir: Path, opts: BatchOptions,
                    devices: list[str], result: RunResult) -> None:
    if not items:
        return
    from tilscore.cluster import open_client

    kind = opts.cluster or "local"
    n_workers = len(devices) if len(devices) > 1 else opts.workers
    # Local workers share this node's cores; remote workers use all of theirs.
    from tilscore.infer import usable_cores

    threads = max(1, usable_cores() // n_workers) if kind == "local" else None
    with open_client(kind, n_workers, opts.cluster_config) as client:
        from distributed import as_completed

        futures, owner = [], {}
        for item in items:
            future = client.submit(_score_on_worker, item, str(out_dir), opts, devices,
                                   threads, key=f"tilscore-{item.slide_id}-{os.urandom(4).hex()}",
                                   pure=False)
            futures.append(future)
            owner[future.key] = item
        with _slide_bar(len(items), opts.quiet) as bar:
            for future in as_completed(futures):
                item = owner[future.key]
                try:
                    outcome = future.result()
                except UsageError:
                    client.cancel(futures)
                    raise
                except Exception as exc:  # the worker died (OOM killer, segfault, ...)
                    outcome = {"slide_id": item.slide_id, "input": str(item.path),
                               "error": f"worker lost: {one_line(exc)}"}
                _collect(outcome, result, bar)
                if opts.fail_fast and result.failures:
                    client.cancel(futures)
                    break


_WORKER_ENGINES: dict[tuple, object] = {}  # per worker process: loaded once, reused


def _score_on_worker(item: InputSlide, out_dir: str, opts: BatchOptions,
                     devices: list[str], cpu_threads: int | None) -> dict:
    """Runs in a Dask worker: pick this worker's device, load (once) and score.
    `cpu_threads`: torch threads (local workers split the node's cores; None = all)."""
    device = _worker_device(devices)
    key = (opts.model, opts.mode, opts.region_model, item.stain, device)
    if key not in _WORKER_ENGINES:
        _WORKER_ENGINES[key] = load_engine(opts, item.stain, device, cpu_threads)
    return _score_one(item, Path(out_dir), _WORKER_ENGINES[key], replace(opts, quiet=True))


def _worker_device(devices: list[str]) -> str:
    """Local workers are named 0..N-1: worker k takes devices[k mod len]."""
    if len(devices) == 1:
        return devices[0]
    from distributed import get_worker

    name = get_worker().name
    index = name if isinstance(name, int) else int(str(name).rsplit("-", 1)[-1] or 0)
    return devices[index % len(devices)]


# -- resume and tables ------------------------------------------------------------------

def _model_and_config(opts: BatchOptions, stain: str) -> tuple[str, str]:
    """(model sha256, config hash) a complete earlier result must match to be reused."""
    from tilscore.pipeline import config_hash, fast_region_model, model_card

    region = fast_region_model(opts.mode, stain, opts.region_model)  # bad mode: fails here
    card = model_card(opts.model, stain)
    region_card = None if region is None else model_card(region, stain)
    return card.sha256, config_hash(card, stain, opts.cfg, region_card)


def completed_summary(out_dir: Path, item: InputSlide, model_sha256: str,
                      cfg_hash: str) -> dict | None:
    """The existing summary of `item` if its outputs are complete (a valid summary.json,
    which is written last, and every other output) and were made with the same model,
    configuration and metadata; None means: score it. A malformed summary or a missing
    output is logged, naming the file, and the slide is rescored."""
    from tilscore.summary import SummaryProblem, missing_outputs, read_summary

    folder = out_dir / item.slide_id
    try:
        summary = read_summary(folder / "summary.json")
    except FileNotFoundError:
        return None
    except SummaryProblem as exc:
        log.warning("%s", exc)
        return None
    missing = missing_outputs(folder)
    if missing:
        log.warning("%s: %s missing; the slide is not complete: rescoring it", folder,
                    ", ".join(missing))
        return None
    same_model = summary["model"].get("sha256") == model_sha256
    same_config = summary.get("config_hash") == cfg_hash
    same_metadata = summary.get("metadata", {}) == dict(item.metadata)
    return summary if same_model and same_config and same_metadata else None


def all_summaries(out_dir: Path) -> list[dict]:
    """Every valid slide summary under `out_dir` (one per slide folder); malformed ones
    are logged, naming the file, and left out."""
    from tilscore.summary import SummaryProblem, read_summary

    rows = []
    for path in sorted(out_dir.glob("*/summary.json")):
        if path.parent.name.startswith("."):
            continue  # a work folder, or a replaced one
        try:
            rows.append(read_summary(path))
        except (OSError, SummaryProblem) as exc:
            log.warning("left out of scores.csv: %s", exc)
    return rows


def write_tables(out_dir: Path, failures: list[dict]) -> None:
    """scores.csv from every summary in `out_dir`; failures.csv from this run."""
    write_scores(out_dir)
    atomic.write_csv(out_dir / "failures.csv", ["input", "error"], failures)


def write_scores(out_dir: Path, summaries: list[dict] | None = None) -> Path:
    """``scores.csv``: one row per slide summary (default: :func:`all_summaries`), its
    scalar fields as dotted columns (:func:`flatten`), QC flag codes and warnings as text;
    a column empty in every row (e.g. tumour and stroma with ``--model none``) is left
    out."""
    rows = [flatten(s) for s in (all_summaries(out_dir) if summaries is None else summaries)]
    fields = sorted({k for row in rows for k, v in row.items() if v not in (None, "")}
                    | set(ALWAYS_COLUMNS if rows else ()), key=_column_order)
    atomic.write_csv(out_dir / "scores.csv", fields, rows)
    return out_dir / "scores.csv"


ALWAYS_COLUMNS = ("slide", "qc.flags", "warnings")  # empty QC columns mean: nothing found
LIST_SEPARATOR = "; "  # joins a list of texts (warnings, QC flag codes) into one cell


def flatten(summary: dict, prefix: str = "") -> dict:
    """Scalar fields of a nested summary as a flat dict with dotted keys; a list of texts
    (``warnings``) becomes one text joined by "; ", a list of QC flags (``qc.flags``) the
    joined flag codes; other lists are left out."""
    flat = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            flat[name] = LIST_SEPARATOR.join(value)
        elif isinstance(value, list) and all(isinstance(v, dict) and "code" in v
                                             for v in value):
            flat[name] = LIST_SEPARATOR.join(str(v["code"]) for v in value)
    return flat


def _column_order(key: str) -> tuple[int, str]:
    first = ("slide", "stain", "stromal_til_percent", "til_score_tiger", "percent_positive",
             "qc.flags", "warnings")
    if key in first:
        return (first.index(key), "")
    return (len(first) + (0 if key.startswith("metadata.") else 1), key)


def _ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".tilscore-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output folder {out_dir} is not writable: {exc.strerror}") from exc
