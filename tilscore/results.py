"""Results of a run as tables: the completed summary of a slide (resume), every summary of
an output folder, ``scores.csv`` (one flat row per slide) and ``failures.csv``.

Read by :mod:`tilscore.batch` (resume, the run's tables) and :mod:`tilscore.report` (the
cohort), so neither imports the other for them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tilscore.inputs import InputSlide
from tilscore.io import atomic
from tilscore.summary import SummaryProblem, missing_outputs, read_summary

log = logging.getLogger(__name__)


def completed_summary(out_dir: Path, item: InputSlide, *, model_sha256: str,
                      cfg_hash: str) -> dict | None:
    """The existing summary of `item` if its outputs are complete (a valid summary.json,
    which is written last, and every other output) and were made with the same model,
    configuration and metadata; None means: score it. A malformed summary or a missing
    output is logged, naming the file, and the slide is rescored."""
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
    atomic.write_csv(out_dir / "failures.csv", ["input", "error"], rows=failures)


def write_scores(out_dir: Path) -> Path:
    """``scores.csv``: one row per valid slide summary (:func:`all_summaries`), its
    scalar fields as dotted columns (:func:`flatten`), QC flag codes and warnings as text;
    a column empty in every row (e.g. tumour and stroma with ``--model none``) is left
    out."""
    rows = [flatten(s) for s in all_summaries(out_dir)]
    fields = sorted({k for row in rows for k, v in row.items() if v not in (None, "")}
                    | set(ALWAYS_COLUMNS if rows else ()), key=_column_order)
    atomic.write_csv(out_dir / "scores.csv", fields, rows=rows)
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
