"""A slide's work folder and publishing it: outputs are written into
``OUT/.<id>.tmp-<host>-<pid>-<random>/`` and renamed to ``OUT/<id>/`` when complete, so a
crash never leaves a half-written slide folder; what killed runs left is removed by
:func:`remove_stale_work_dirs` (their slide lock is free: :mod:`tilscore.io.locks`)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from tilscore.errors import InputError
from tilscore.interrupt import deferred_signals
from tilscore.io import atomic
from tilscore.io.locks import LOCK_SUFFIX, SlideLock, locks_work


def make_work_dir(out_dir: Path, slide_id: str) -> Path:
    """A new, empty work folder for `slide_id` in `out_dir` (the caller holds the slide's
    lock). Host and PID in the name tell a person whose it is; what makes it stale is its
    free slide lock (:func:`remove_stale_work_dirs`); mkdtemp's random suffix keeps it
    unique."""
    prefix = f".{slide_id}.tmp-{atomic.host_tag()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir))


PUBLISH_ATTEMPTS = 5


def publish(work: Path, final: Path) -> None:
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
