"""``cells.csv``: one row per detected cell, written fast for millions of rows.

Rows are formatted without a per-row Python loop: each column becomes a (rows, width)
uint8 matrix of ASCII characters plus a mask of which characters are real (numbers are
right-aligned digits, strings are left-aligned), the columns are laid side by side with
the separators, and the masked characters of the whole chunk are taken in row-major
order, which drops the padding and yields the CSV bytes. About 10× faster than
``"%.2f" % row`` per row (see the module test for the figure).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tilscore.io.atomic import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("x_px", "y_px", "x_um", "y_um", "class", "compartment", "score")
DECIMALS = {"x_px": 2, "y_px": 2, "x_um": 2, "y_um": 2, "score": 3,
            "intensity_bin": 0,  # an integer 0-3
            "nucleus_area_um2": 1}
CHUNK_ROWS = 262_144

Field = tuple[np.ndarray, np.ndarray]  # chars uint8 (n, w), valid bool (n, w)


def write_cells_csv(path: str | Path, cells: dict[str, np.ndarray], *,
                    chunk_rows: int = CHUNK_ROWS, extra: tuple[str, ...] = ()) -> None:
    """Write ``cells.csv`` atomically with columns ``x_px,y_px,x_um,y_um,class,compartment,score``
    and then the columns named in `extra`: numbers with 3 decimals (e.g. ``dab_od`` on IHC;
    ``intensity_bin`` as an integer), or strings when the array holds text (e.g. the IHC
    ``gate``).

    `cells`: equal-length 1-D arrays under those keys (extra keys are ignored): ``x_px``,
    ``y_px`` level-0 pixels and ``x_um``, ``y_um`` micrometres (written with 2 decimals),
    ``class`` and ``compartment`` str, ``score`` (3 decimals). Numbers are rounded half
    to even on the scaled value (so an exact tie such as 0.125 may differ from ``%.2f``
    in the last digit); non-finite numbers are written as ``nan``. Class and compartment
    names must not contain ``,``, ``"`` or newlines (they are fixed vocabularies).
    """
    columns = (*COLUMNS, *extra)
    missing = [c for c in columns if c not in cells]
    if missing:
        raise ValueError(f"cells table lacks columns {missing}; needs {list(columns)}")
    cols = {c: np.asarray(cells[c]) for c in columns}
    n = len(cols["x_px"])
    bad = {c: v.shape for c, v in cols.items() if v.ndim != 1 or len(v) != n}
    if bad:
        raise ValueError(f"cells columns must be 1-D of length {n}; got shapes {bad}")
    text = [c for c in columns if c in ("class", "compartment") or cols[c].dtype.kind in "US"]
    for c in text:
        _check_names(cols[c], c)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write((",".join(columns) + "\n").encode())
        for start in range(0, n, chunk_rows):
            sl = slice(start, start + chunk_rows)
            m = len(cols["x_px"][sl])
            pieces: list[Field] = []
            for i, c in enumerate(columns):
                v = cols[c][sl]
                pieces.append(format_strings(v) if c in text
                              else format_fixed(v, DECIMALS.get(c, 3)))
                pieces.append(literal("\n" if i == len(columns) - 1 else ",", m))
            fh.write(join_fields(pieces))
    log.debug("wrote %d cells to %s", n, path)


def _check_names(values: np.ndarray, column: str) -> None:
    for name in np.unique(values.astype(str)):
        if any(ch in name for ch in ',"\n\r'):
            raise ValueError(f"{column} value {name!r} contains a CSV special character")


def format_fixed(values: np.ndarray, decimals: int) -> Field:
    """Numbers as fixed-point ASCII with `decimals` decimals (``%.{decimals}f`` style)."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    scaled = np.rint(np.where(finite, v, 0.0) * 10.0**decimals)
    if np.any(np.abs(scaled) >= 2**62):
        raise ValueError("value too large for fixed-point CSV formatting")
    mag = np.abs(scaled).astype(np.int64)
    neg = scaled < 0
    n_int = max(1, len(str(int(mag.max(initial=0)) // 10**decimals)))
    width = 1 + n_int + 1 + decimals  # sign, integer digits, point, decimals
    chars = np.zeros((len(v), width), np.uint8)
    valid = np.zeros((len(v), width), bool)
    rest = mag.copy()
    for k in range(decimals + n_int):  # k-th digit from the right
        col = width - 1 - k if k < decimals else width - 2 - k
        chars[:, col] = ord("0") + rest % 10
        rest //= 10
        # integer digits beyond the units place are shown only when non-zero-leading
        valid[:, col] = True if k <= decimals else mag >= 10 ** k
    point = width - 1 - decimals
    chars[:, point] = ord(".")
    valid[:, point] = decimals > 0
    # the sign sits just left of the first digit: find that column per row
    n_digits_int = np.ones(len(v), np.int64)
    for k in range(1, n_int):
        n_digits_int += mag >= 10 ** (decimals + k)
    sign_col = point - n_digits_int - 1
    rows = np.flatnonzero(neg)
    chars[rows, sign_col[rows]] = ord("-")
    valid[rows, sign_col[rows]] = True
    if not finite.all():
        rows = np.flatnonzero(~finite)
        valid[rows] = False
        chars[rows, :3] = np.frombuffer(b"nan", np.uint8)
        valid[rows, :3] = True
    return chars, valid


def format_strings(values: np.ndarray, encode=None) -> Field:
    """Categorical strings (few distinct values) as left-aligned UTF-8; `encode` maps
    each distinct str to its output text (e.g. ``json.dumps``)."""
    names, inverse = np.unique(np.asarray(values).astype(str), return_inverse=True)
    encoded = [(encode(name) if encode else name).encode("utf-8") for name in names]
    width = max([len(e) for e in encoded] + [1])
    table = np.zeros((len(names), width), np.uint8)
    mask = np.zeros((len(names), width), bool)
    for i, e in enumerate(encoded):
        table[i, :len(e)] = np.frombuffer(e, np.uint8)
        mask[i, :len(e)] = True
    inverse = inverse.reshape(-1)
    return table[inverse], mask[inverse]


def literal(text: str, n: int, *, rows: np.ndarray | None = None) -> Field:
    """The same `text` on each of `n` rows (only where bool `rows` is True, if given)."""
    b = np.frombuffer(text.encode("utf-8"), np.uint8)
    chars = np.broadcast_to(b, (n, len(b)))
    valid = np.ones((n, len(b)), bool) if rows is None else np.repeat(
        np.asarray(rows, bool)[:, None], len(b), axis=1)
    return chars, valid


def join_fields(fields: list[Field]) -> bytes:
    """Concatenate the fields of each row, rows one after another, padding dropped."""
    chars = np.concatenate([f[0] for f in fields], axis=1)
    valid = np.concatenate([f[1] for f in fields], axis=1)
    return chars[valid].tobytes()
