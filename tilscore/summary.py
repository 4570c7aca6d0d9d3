"""A slide's ``summary.json``: the one schema every reader checks it against.

The summary is written last into a slide's folder and marks the slide complete; ``score``
(resume), ``scores.csv`` and ``tilscore report`` all read it. A summary that is not a
JSON object of the expected shape (a list, ``model`` or ``qc`` a string, a hand edit gone
wrong, a file from another tool) is "not complete: rescore it", naming the file, never a
crash (:func:`read_summary`). The schema types only what readers rely on; other fields
pass through, so summaries of earlier tilscore versions stay readable.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Every output of a complete slide folder (summary.json last); a rerun redoes a slide that
# lacks any of them.
OUTPUT_FILES = ("summary.json", "cells.csv", "cells.geojson", "regions.geojson", "maps.zarr",
                "overlay.png")

Number = float | None  # JSON numbers (ints included); null where not measured


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)


class ModelInfo(_Open):
    name: str
    version: str | None = None
    sha256: str | None = None


class QcFlag(_Open):
    code: str
    message: str = ""


class Qc(_Open):
    flags: list[QcFlag] = Field(default_factory=list)


class SlideSummary(_Open):
    """The fields of ``summary.json`` that tilscore reads back (others pass through)."""

    slide: str
    stain: str
    model: ModelInfo
    config_hash: str | None = None
    path: str | None = None
    mpp: Number = None
    metadata: dict[str, str] = Field(default_factory=dict)
    areas_mm2: dict[str, Number] = Field(default_factory=dict)
    counts: dict[str, dict[str, int | None]] = Field(default_factory=dict)
    densities_per_mm2: dict[str, dict[str, Number]] = Field(default_factory=dict)
    stromal_til_percent: Number = None
    til_score_tiger: Number = None
    percent_positive: Number = None
    til_parts: dict = Field(default_factory=dict)
    fast: dict = Field(default_factory=dict)
    positive_rule: dict = Field(default_factory=dict)
    score_config: dict = Field(default_factory=dict)
    spatial: dict = Field(default_factory=dict)  # tilscore.scoring.spatial.SpatialSummary
    timings_s: dict = Field(default_factory=dict)
    qc: Qc = Field(default_factory=Qc)
    warnings: list[str] = Field(default_factory=list)
    runtime_s: Number = None


class SummaryProblem(ValueError):
    """Why a slide's summary.json cannot be used; ``str()`` is one line naming the file."""


def check_summary(data: object) -> dict:
    """`data` (a parsed summary) if it fits :class:`SlideSummary`; ValueError otherwise
    (the first problem, one line)."""
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but a {type(data).__name__}")
    try:
        SlideSummary.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ValueError(f"{where}: {err['msg']}") from None
    return data


def read_summary(path: str | Path) -> dict:
    """The summary at `path`, checked (:func:`check_summary`). FileNotFoundError when
    absent; :class:`SummaryProblem` ("... not complete: rescore it") when unreadable or
    malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise SummaryProblem(f"{path}: unreadable ({exc}); the slide is not complete: "
                             "rescore it") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SummaryProblem(f"{path}: not valid JSON ({exc}); the slide is not complete: "
                             "rescore it") from exc
    try:
        return check_summary(data)
    except ValueError as exc:
        raise SummaryProblem(f"{path}: malformed summary ({exc}); the slide is not "
                             "complete: rescore it") from exc


def missing_outputs(folder: Path) -> list[str]:
    """The outputs of :data:`OUTPUT_FILES` that `folder` lacks (an OME-Zarr without its
    root ``zarr.json`` counts as missing)."""
    missing = []
    for name in OUTPUT_FILES:
        path = folder / name
        ok = (path / "zarr.json").is_file() if name.endswith(".zarr") else path.is_file()
        if not ok:
            missing.append(name)
    return missing
