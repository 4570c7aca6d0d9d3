"""Atomic file writes: write to a temporary name in the same folder, then rename.

A crash or SIGKILL at any moment leaves either the old file or the complete new one,
never a half-written file (os.replace is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

UMASK = os.umask(0)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 (and some writers, e.g. safetensors, recreate the file):
        # outputs are shared files, so set the umask's mode on what was written.
        os.chmod(tmp_path, 0o666 & ~UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# Spreadsheet formula injection (OWASP "CSV Injection"): Excel, LibreOffice and Google
# Sheets evaluate a cell that starts with one of these as a formula, so a manifest value
# such as ``=HYPERLINK(...)`` or ``-2+3+cmd|' /C calc'!A0`` in scores.csv would run when a
# statistician opens the file. Such text is written with a leading single quote (OWASP's
# recommendation: shown as text, the quote hidden); plain numbers, negative ones
# included, are left as they are.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value):
    """`value` as written into a CSV cell: text that a spreadsheet would run as a formula
    gets a leading ``'``; numbers (of any type, or text that is one plain number such as
    ``-1.5``) and other values are unchanged."""
    if (isinstance(value, str) and value.startswith(FORMULA_STARTS)
            and not _PLAIN_NUMBER.fullmatch(value)):
        return "'" + value
    return value


def read_csv_value(text: str) -> str:
    """Inverse of :func:`spreadsheet_safe` for a value read back from a tilscore CSV."""
    if text.startswith("'") and text[1:].startswith(FORMULA_STARTS):
        return text[1:]
    return text


def write_csv(path: str | Path, fieldnames: list[str], *, rows: Iterable[dict]) -> None:
    """A CSV table written atomically; text cells that would start a spreadsheet formula
    are neutralised (:func:`spreadsheet_safe`)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[spreadsheet_safe(f) for f in fieldnames],
                                extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({spreadsheet_safe(k): spreadsheet_safe(v) for k, v in row.items()})


def host_tag() -> str:
    """This host's name reduced to letters and digits (no "-": work-folder names use "-"
    as a separator between host and process id)."""
    return "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


def pid_alive(pid: int) -> bool:
    """True while process `pid` of this host runs (a killed process not yet reaped by
    its parent, a zombie, no longer counts): decides whether a work folder is stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state is the field after the parenthesised command name
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
