"""Stopping a run on SIGTERM or SIGINT: no new slide, the tables written, nothing left.

Slurm sends SIGTERM on ``scancel`` and at the time limit (SIGKILL follows after its
KillWait, 30 s by default); Ctrl-C sends SIGINT. While :func:`stop_on_signals` is active
either one raises :class:`Interrupted` in the main thread, wherever it is: the slide in
its device pass unwinds (its work folder is removed and its lock released, as on any
error), a slide already being written on the background thread is finished, and the
batch writes ``scores.csv`` and ``failures.csv`` for what is done
(:func:`tilscore.batch.score_inputs`); the CLI then says so in one line and exits
128 + the signal number (143 for SIGTERM, 130 for SIGINT). A signal that arrives inside
:func:`deferred_signals` (publishing a slide folder, writing the tables) waits for the
block to end, so those are never cut in half.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal, raised in the main thread (a BaseException, like KeyboardInterrupt:
    ``except Exception`` does not swallow it). `exit_code` = 128 + the signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.result = None  # what the run had done (a tilscore.batch.RunResult), if known
        super().__init__(f"interrupted by {self.name}")


_state = threading.local()  # main thread only: depth of deferred_signals, pending signal
_active = threading.Event()  # stop_on_signals is installed


def _handler(signum: int, frame) -> None:
    if getattr(_state, "depth", 0) > 0:
        _state.pending = signum  # raised when the block ends
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread while the block
    runs (earlier handlers restored after). Outside the main thread: no effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    _active.set()
    try:
        yield
    finally:
        _active.clear()
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """In the main thread under :func:`stop_on_signals`: a stop signal arriving inside
    the block is raised when it ends (only then). Elsewhere: no effect (signals are
    handled in the main thread only)."""
    if threading.current_thread() is not threading.main_thread() or not _active.is_set():
        yield
        return
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if _state.depth == 0 and getattr(_state, "pending", None) is not None:
            pending, _state.pending = _state.pending, None
            raise Interrupted(pending)
