"""Per-slide advisory locks: which live run, if any, owns a slide of an output folder.

A run scoring slide X holds an exclusive ``flock`` on ``OUT/.X.tilscore-lock`` for as
long as X's work folder exists: it takes the lock, then creates the folder, and removes
or publishes the folder before it lets the lock go. A kernel lock belongs to an open file, not to a
process id, so it holds between runs that share a host name but not a PID namespace
(containers with host networking, Kubernetes pods with ``hostNetwork``) and, where the
filesystem supports it (local filesystems; NFS through its lock manager), between hosts;
and the operating system releases it when its process dies, however it dies (SIGKILL,
OOM killer). Hence:

- a work folder of X whose lock can be taken belongs to no live run: it is stale;
- a slide whose lock is held is being scored by another run: skip it for now.

The holder unlinks the lock file before releasing it, so no lock files accumulate; a
waiter that locked a file that was unlinked meanwhile notices (another inode at the path)
and tries again. On a filesystem without working locks (``ENOLCK``, ``EOPNOTSUPP``, or no
``fcntl`` at all) :func:`locks_work` is False and callers fall back to an age rule.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".tilscore-lock"  # specific: never another tool's lock file
POLL_S = 0.5  # how often a waiting run tries a held lock again
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / f".{slide_id}{LOCK_SUFFIX}"


class SlideLock:
    """The exclusive lock on slide `slide_id` of output folder `out_dir`; a context
    manager once acquired. Where locking does not work, :meth:`acquire` always succeeds
    (nothing is locked; see :func:`locks_work`)."""

    def __init__(self, out_dir: Path, slide_id: str):
        self.path = lock_path(out_dir, slide_id)
        self._fd: int | None = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self, wait: bool = False, poll_s: float = POLL_S) -> bool:
        """Take the lock: True when this object holds it; False when another run does
        and `wait` is False (with `wait`, try again every `poll_s` seconds: a signal can
        interrupt the wait)."""
        if self._held:
            return True
        if not locks_work(self.path.parent):
            self._held = True
            return True
        while True:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if not wait:
                    return False
                time.sleep(poll_s)
                continue
            except BaseException:
                os.close(fd)
                raise
            try:  # the previous holder may have unlinked the file we opened: try again
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd, self._held = fd, True
                return True
            os.close(fd)

    def release(self) -> None:
        """Let the lock go (the file is unlinked first, while still held). Idempotent."""
        fd, self._fd, self._held = self._fd, None, False
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> SlideLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_WORKS: dict[str, bool] = {}


def locks_work(folder: Path) -> bool:
    """Whether flock works in `folder` (probed once per folder and process)."""
    key = str(Path(folder).resolve())
    if key not in _WORKS:
        _WORKS[key] = _probe(Path(folder))
    return _WORKS[key]


def _probe(folder: Path) -> bool:
    if fcntl is None:
        log.warning("no file locking on this platform: concurrent runs on %s may score a "
                    "slide twice", folder)
        return False
    fd, name = tempfile.mkstemp(prefix=".tilscore-lock-probe-", dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LOCKING:
            raise
        log.warning("the filesystem of %s does not support file locks (%s): concurrent "
                    "runs on it may score a slide twice, and work folders of killed runs "
                    "are removed only when a day old", folder, exc.strerror)
        return False
    finally:
        os.close(fd)
        os.unlink(name)
