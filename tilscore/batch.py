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
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from tilscore.cluster import open_client
from tilscore.engine.defaults import DECODE_MODES, DEFAULT_DECODE
from tilscore.engine.infer import usable_cores
from tilscore.engine.load import Engine, config_hash, fast_region_model, model_card
from tilscore.errors import TilscoreError, UsageError
from tilscore.inputs import InputSlide, check_stain, expand_inputs
from tilscore.interrupt import deferred_signals
from tilscore.io.locks import SlideLock
from tilscore.io.publish import remove_stale_work_dirs
from tilscore.pipeline import score_slide, start_slide
from tilscore.report.cohort import write_report
from tilscore.results import completed_summary, flatten
from tilscore.results import write_tables as _write_scores_and_failures
from tilscore.samples import SampleColumns, write_samples
from tilscore.scoring.score import ScoreConfig
from tilscore.slide.base import validate_mpp

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
    decode: str = DEFAULT_DECODE  # JPEG tiles decoded on the device (auto: on CUDA) or the host
    mode: str = "full"  # "fast" (H&E): regions at 2 µm/px everywhere, cells in bulk stroma
    region_model: str | None = None  # the fast mode's region model (None: he-regions)
    cluster: str | None = None
    workers: int = 1
    cluster_config: Path | None = None
    report: bool = True  # write or refresh OUT/report.html at the end
    command: str | None = None  # the command line recorded in each summary (None: none)
    # Finish (aggregate, write) slide N-1 on a thread while slide N uses the device. None:
    # on CUDA only (a CPU's cores are all busy with the model: measured no gain on 2 cores)
    overlap_writes: bool | None = None
    sample_columns: tuple[str, str] = ("patient_id", "sample_id")  # samples.csv ids


@dataclass
class RunResult:
    """This run's rows (scored or skipped), failures, and ids skipped as already done
    (`elsewhere`: those of them another run scored while this one ran)."""

    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    scored: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Job:
    """A slide this run has to score, and how to recognise it scored by another run
    meanwhile: a complete summary with the same model and configuration hashes, other
    than the one found when the run planned (`stamp`: inode, mtime, size; None: none)."""

    item: InputSlide
    model_sha256: str
    cfg_hash: str
    stamp: tuple[int, int, int] | None


def score_inputs(inputs: list[str], out_dir: str | Path, *, opts: BatchOptions | None = None,
                 **overrides) -> RunResult:
    """Score every input; failures are collected, not raised (UsageError still raises).

    Slides whose complete outputs exist with the same model and configuration are
    skipped (``overwrite`` redoes them). Keyword `overrides` replace fields of `opts`.
    """
    opts = replace(opts or BatchOptions(), **overrides)
    if opts.decode not in DECODE_MODES:  # before any slide is touched
        raise UsageError(f"unknown decode {opts.decode!r}; valid: {', '.join(DECODE_MODES)}")
    if opts.mpp is not None:  # before any slide: the option is wrong for all of them
        validate_mpp(opts.mpp, "--mpp")
    out_dir = Path(out_dir)
    check_stain(opts.stain)
    expanded = expand_inputs(inputs)
    items = [replace(i, stain=i.stain or opts.stain) for i in expanded if not i.problem]
    _ensure_writable(out_dir)
    for path in remove_stale_work_dirs(out_dir):
        log.info("removed %s, left by a killed run", path.name)
    result = RunResult()
    for bad in (i for i in expanded if i.problem):  # this input's failure, not the batch's
        result.failures.append({"input": str(bad.path), "error": bad.problem})
        log.warning("%s: failed: %s", bad.slide_id or bad.path.name, bad.problem)
    hashes = {s: _model_and_config(opts, s) for s in sorted({i.stain for i in items})}
    todo = []
    for item in items:
        model_sha256, cfg_hash = hashes[item.stain]
        done = None if opts.overwrite else completed_summary(
            out_dir, item, model_sha256=model_sha256, cfg_hash=cfg_hash)
        if done is None:
            todo.append(_Job(item, model_sha256, cfg_hash, _summary_stamp(out_dir, item)))
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
    except BaseException as exc:  # a stop signal (tilscore.interrupt), an error
        exc.result = result  # what was done, for the message
        with deferred_signals():
            # what was scored
            write_tables(out_dir, result.failures, sample_columns=opts.sample_columns)
            remove_stale_work_dirs(out_dir)  # e.g. those of workers stopped with it
        raise
    with deferred_signals():
        write_tables(out_dir, result.failures, sample_columns=opts.sample_columns)
    if opts.report and (result.rows or result.failures):
        _refresh_report(out_dir)
    return result


def _refresh_report(out_dir: Path) -> None:
    """The cohort report is a convenience: its failure never fails the batch."""
    try:
        write_report(out_dir)
    except Exception as exc:  # reported; the scores stand
        log.warning("report.html not written: %s", one_line(exc))


# -- sharing an output folder with other runs ---------------------------------------------

def _summary_stamp(out_dir: Path, item: InputSlide) -> tuple[int, int, int] | None:
    try:
        st = (out_dir / item.slide_id / "summary.json").stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _claim(job: _Job, out_dir: Path, wait: bool) -> tuple[str, object]:
    """Take `job`'s slide lock: ("mine", the held SlideLock): score it; ("done",
    summary): another run scored it since this one planned; ("busy", None): another run
    holds it now (only when not `wait`ing for it)."""
    lock = SlideLock(out_dir, job.item.slide_id)
    if not lock.acquire(wait=wait):
        return "busy", None
    if _summary_stamp(out_dir, job.item) != job.stamp:
        done = completed_summary(out_dir, job.item, model_sha256=job.model_sha256,
                                 cfg_hash=job.cfg_hash)
        if done is not None:
            lock.release()
            return "done", done
    return "mine", lock


def _claims(jobs: list[_Job], out_dir: Path, result: RunResult, bar):
    """(job, held lock) of every slide this run scores, in order. A slide another run is
    scoring now is put off until the others are done, then waited for: taken as done
    if that run completed it, scored here if not (it failed, or was killed). So runs
    sharing an output folder share the work and each slide is scored once."""
    later = []
    for wait, round_ in ((False, jobs), (True, later)):
        for job in round_:
            kind, got = _claim(job, out_dir, wait)
            if kind == "busy":
                log.info("%s: another run is scoring it; back to it later", job.item.slide_id)
                later.append(job)
            elif kind == "done":
                _take_done(job, got, result, bar)
            else:
                yield job, got


def _take_done(job: _Job, summary: dict, result: RunResult, bar) -> None:
    result.rows.append(flatten(summary))
    result.skipped.append(job.item.slide_id)
    result.elsewhere.append(job.item.slide_id)
    log.info("%s: scored by another run", job.item.slide_id)
    bar.update(1)


# -- in this process ----------------------------------------------------------------------

def _run_here(jobs: list[_Job], out_dir: Path, opts: BatchOptions,
              result: RunResult) -> None:
    """Score `jobs` in this process, one device. With ``opts.overlap_writes`` (default:
    on CUDA) pipelined by one slide: while slide N uses the device, slide N-1 is
    aggregated and written on a background thread (:func:`tilscore.pipeline.start_slide`),
    so writing is off the device's critical path; at most one slide waits to be
    finished."""
    engines: dict[str, object] = {}
    pending = None  # the previous slide's finish, running
    with _slide_bar(len(jobs), opts.quiet) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:
        for job, lock in _claims(jobs, out_dir, result, bar):
            item = job.item
            try:
                if item.stain not in engines:  # UsageError (no model for the stain) raises
                    engines[item.stain] = load_engine(opts, item.stain, device=opts.device)
            except BaseException:
                lock.release()
                raise
            started = _start_one(item, out_dir, engines[item.stain], opts, lock)
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


def load_engine(opts: BatchOptions, stain: str, *, device: str,
                cpu_threads: int | None = None) -> Engine:
    """The :class:`~tilscore.engine_load.Engine` `opts` asks for, for `stain` on `device`."""
    return Engine.load(opts.model, stain, device=device, cpu_threads=cpu_threads,
                       compile_model=opts.compile, mode=opts.mode,
                       region_model=opts.region_model)


def _slide_kwargs(item: InputSlide, opts: BatchOptions) -> dict:
    return dict(stain=item.stain, mpp=opts.mpp, cfg=opts.cfg, read_threads=opts.read_threads,
                batch_size=opts.batch_size, quiet=opts.quiet, decode=opts.decode,
                command=opts.command)


def _score_one(item: InputSlide, out_dir: Path, engine, opts: BatchOptions, lock) -> dict:
    """Score one slide (its held `lock` is taken over); a slide's failure is returned as
    data, never raised."""
    return _finish_one(item, lambda: score_slide(item, out_dir, engine=engine, lock=lock,
                                                 **_slide_kwargs(item, opts)))


def _start_one(item: InputSlide, out_dir: Path, engine, opts: BatchOptions, lock):
    """The slide's device pass: its ``finish`` callable, or its failure as data."""
    try:
        return start_slide(item, out_dir, engine=engine, lock=lock, **_slide_kwargs(item, opts))
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
    # disable=None: shown only on a terminal, so logs and CI stay clean.
    return tqdm(total=total, desc="slides", unit="slide", disable=True if quiet else None,
                dynamic_ncols=True, position=0)


# -- devices and clusters ---------------------------------------------------------------

def resolve_devices(opts: BatchOptions) -> list[str]:
    """One device per worker process: `opts.devices` when given (``("all",)`` = every
    visible GPU); otherwise every GPU when the device is auto and there are several,
    else ``[opts.device]``."""
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = list(opts.devices)
    if devices == ["all"] or (not devices and opts.device == "auto" and n_gpus > 1
                              and opts.cluster is None and opts.workers == 1):
        if devices and n_gpus == 0:
            raise UsageError("--devices all: no CUDA GPU is visible")
        devices = [f"cuda:{k}" for k in range(n_gpus)] or [opts.device]
    return devices or [opts.device]


def _run_on_cluster(jobs: list[_Job], out_dir: Path, opts: BatchOptions,
                    devices: list[str], result: RunResult) -> None:
    if not jobs:
        return

    kind = opts.cluster or "local"
    n_workers = len(devices) if len(devices) > 1 else opts.workers
    # Local workers share this node's cores; remote workers use all of theirs.

    threads = max(1, usable_cores() // n_workers) if kind == "local" else None
    with open_client(kind, n_workers, cluster_config=opts.cluster_config) as client, \
            _slide_bar(len(jobs), opts.quiet) as bar:
        # Slides another run is scoring come back "busy": they are sent again, to wait
        # for that run, once every other slide is done (as _claims does in one process).
        for wait in (False, True):
            jobs = _submit_all(client, jobs, out_dir, opts, devices, threads, wait,
                               result, bar)
            if not jobs or (opts.fail_fast and result.failures):
                break


def _submit_all(client, jobs: list[_Job], out_dir: Path, opts: BatchOptions,
                devices: list[str], threads: int | None, wait: bool, result: RunResult,
                bar) -> list[_Job]:
    """One task per job on the cluster, outcomes collected as they finish; returns the
    jobs that came back busy."""
    from distributed import as_completed  # lazy: Dask (~1 s), only for runs on Dask workers

    futures, owner, busy = [], {}, []
    for job in jobs:
        future = client.submit(_score_on_worker, job, str(out_dir), opts, devices, threads,
                               wait, key=f"tilscore-{job.item.slide_id}-{os.urandom(4).hex()}",
                               pure=False)
        futures.append(future)
        owner[future.key] = job
    for future in as_completed(futures):
        job = owner[future.key]
        try:
            outcome = future.result()
        except UsageError:
            client.cancel(futures)
            raise
        except Exception as exc:  # the worker died (OOM killer, segfault, ...)
            outcome = {"slide_id": job.item.slide_id, "input": str(job.item.path),
                       "error": f"worker lost: {one_line(exc)}"}
        if outcome.get("busy"):
            busy.append(job)
        elif "done" in outcome:
            _take_done(job, outcome["done"], result, bar)
        else:
            _collect(outcome, result, bar)
        if opts.fail_fast and result.failures:
            client.cancel(futures)
            break
    return busy


_WORKER_ENGINES: dict[tuple, object] = {}  # per worker process: loaded once, reused


def _score_on_worker(job: _Job, out_dir: str, opts: BatchOptions, devices: list[str],
                     cpu_threads: int | None, wait: bool = False) -> dict:
    """Runs in a Dask worker: pick this worker's device, load (once), claim the slide's
    lock (:func:`_claim`) and score. `cpu_threads`: torch threads (local workers split
    the node's cores; None = all)."""
    item = job.item
    device = _worker_device(devices)
    key = engine_key(opts, item.stain, device=device, cpu_threads=cpu_threads)
    if key not in _WORKER_ENGINES:
        for old in [k for k in _WORKER_ENGINES if k[:2] == key[:2]]:
            del _WORKER_ENGINES[old]  # this stain's engine on this device is stale: free it
        _WORKER_ENGINES[key] = load_engine(opts, item.stain, device=device,
                                           cpu_threads=cpu_threads)
    kind, got = _claim(job, Path(out_dir), wait)
    if kind == "busy":
        return {"slide_id": item.slide_id, "busy": True}
    if kind == "done":
        return {"slide_id": item.slide_id, "done": got}
    return _score_one(item, Path(out_dir), _WORKER_ENGINES[key], replace(opts, quiet=True),
                      got)


def engine_key(opts: BatchOptions, stain: str, *, device: str,
               cpu_threads: int | None = None) -> tuple:
    """Everything a loaded engine depends on, so a long-lived worker (a ``tcp://``
    cluster) reloads when any of it changes: the stain and device first, then the compile
    mode, the mode, the CPU threads and the model's (and the fast mode's region model's)
    card as JSON: its weights' sha256 (which loading checks against the weights file) and
    the model's configuration (tiles, classes, peak threshold). Reads only cards."""
    region = fast_region_model(opts.mode, stain, region_model=opts.region_model)
    cards = [model_card(opts.model, stain)]
    if region is not None:
        cards.append(model_card(region, stain))
    return (stain, device, opts.compile, opts.mode, cpu_threads,
            *(card.model_dump_json() for card in cards))


def _worker_device(devices: list[str]) -> str:
    """Local workers are named 0..N-1: worker k takes devices[k mod len]."""
    if len(devices) == 1:
        return devices[0]
    from distributed import get_worker  # lazy: Dask (~1 s), only on Dask workers

    name = get_worker().name
    index = name if isinstance(name, int) else int(str(name).rsplit("-", 1)[-1] or 0)
    return devices[index % len(devices)]


# -- resume -----------------------------------------------------------------------------

def _model_and_config(opts: BatchOptions, stain: str) -> tuple[str, str]:
    """(model sha256, config hash) a complete earlier result must match to be reused."""
    region = fast_region_model(opts.mode, stain,  # a bad mode fails here
                               region_model=opts.region_model)
    card = model_card(opts.model, stain)
    region_card = None if region is None else model_card(region, stain)
    return card.sha256, config_hash(card, stain, cfg=opts.cfg, region_card=region_card)


def _ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a unique name: runs in other PID namespaces may have this process's PID
        fd, probe = tempfile.mkstemp(prefix=".tilscore-write-test-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output folder {out_dir} is not writable: {exc.strerror}") from exc


def write_tables(out_dir: Path, failures: list[dict],
                 *, sample_columns: tuple[str, str] = ("patient_id", "sample_id")) -> None:
    """scores.csv and samples.csv from every summary in `out_dir`; failures.csv from this
    run. `sample_columns`: the manifest columns naming a slide's patient and sample."""
    _write_scores_and_failures(out_dir, failures)
    write_samples(out_dir, SampleColumns(*sample_columns))
