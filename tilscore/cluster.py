"""Dask clients for batch scoring: a local cluster, an existing scheduler, or Slurm.

Only values come from YAML (`configs/cluster.yaml`); this module turns them into a
dask-jobqueue ``SLURMCluster``. Each Slurm job runs one worker process with the job's
GPUs; the client (the ``tilscore score`` process) only submits slides and collects rows.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, fields
from pathlib import Path

from tilscore.errors import UsageError
from tilscore.yaml_config import read_yaml_mapping

log = logging.getLogger(__name__)
DEFAULT_CLUSTER_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cluster.yaml"
CONNECT_TIMEOUT_S = 20


@dataclass(frozen=True)
class SlurmConfig:
    """One Slurm job = one Dask worker process. `gpus` per job (``--gres=gpu:N``);
    `memory` like ``"64GB"``; `walltime` ``"HH:MM:SS"``; `jobs`: how many to start."""

    queue: str | None = None
    account: str | None = None
    cores: int = 8
    memory: str = "32GB"
    gpus: int = 1
    walltime: str = "04:00:00"
    jobs: int = 2
    local_directory: str | None = None
    job_extra_directives: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()


def load_slurm_config(path: Path | None) -> SlurmConfig:
    """SlurmConfig from the ``slurm:`` section of YAML `path` (None: the one in configs/
    of a source checkout, or the dataclass defaults in an installed copy)."""
    if path is None and not DEFAULT_CLUSTER_CONFIG.exists():
        return SlurmConfig()
    path = Path(path) if path is not None else DEFAULT_CLUSTER_CONFIG
    raw = read_yaml_mapping(path).get("slurm", {}) or {}
    valid = [f.name for f in fields(SlurmConfig)]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise UsageError(f"{path}: unknown slurm key(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(valid)}")
    for key in ("job_extra_directives", "job_script_prologue"):
        if key in raw:
            raw[key] = tuple(raw[key] or ())
    return SlurmConfig(**raw)


def slurm_cluster(cfg: SlurmConfig):
    """A dask-jobqueue SLURMCluster for `cfg` (no jobs submitted until scaled)."""
    from dask_jobqueue import SLURMCluster  # lazy: dask-jobqueue, only for --cluster slurm

    directives = list(cfg.job_extra_directives)
    if cfg.gpus:
        directives.append(f"--gres=gpu:{cfg.gpus}")
    return SLURMCluster(
        queue=cfg.queue, account=cfg.account, cores=cfg.cores, processes=1,
        memory=cfg.memory, walltime=cfg.walltime, local_directory=cfg.local_directory,
        job_extra_directives=directives, job_script_prologue=list(cfg.job_script_prologue),
        # one task at a time per worker: a slide fills the GPU by itself
        worker_extra_args=["--nthreads", "1"],
    )


@contextlib.contextmanager
def open_client(kind: str, n_workers: int = 1, *, cluster_config: Path | None = None):
    """A connected ``distributed.Client``: `kind` ``"local"`` (a LocalCluster of
    `n_workers` single-threaded processes), ``"tcp://HOST:PORT"`` (an existing
    scheduler) or ``"slurm"``. Closed (and a started cluster shut down) on exit."""
    try:
        # lazy: Dask (~1 s), only for runs on Dask workers
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise UsageError("--cluster needs dask.distributed: pip install "
                         "'tilscore[distributed]'") from exc
    with contextlib.ExitStack() as stack:
        if kind == "local":
            cluster = stack.enter_context(LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        elif kind.startswith(("tcp://", "tls://")):
            client = stack.enter_context(_connect(kind))
        elif kind == "slurm":
            cfg = load_slurm_config(cluster_config)
            cluster = stack.enter_context(slurm_cluster(cfg))
            cluster.scale(jobs=cfg.jobs)
            client = stack.enter_context(Client(cluster))
        else:
            raise UsageError(f"unknown --cluster {kind!r}; valid: local, tcp://HOST:PORT, slurm")
        log.info("dask client: %s", client)
        yield client


def _connect(address: str):
    from distributed import Client  # lazy: Dask (~1 s), only for runs on Dask workers

    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"cannot reach the Dask scheduler at {address} "
                         f"(waited {CONNECT_TIMEOUT_S} s): {str(exc).splitlines()[0]}") from exc
