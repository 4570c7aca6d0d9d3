"""The report's data types: a slide folder (:class:`SlideEntry`), the cohort of an output
folder (:class:`Cohort`), a slide's rendered maps (:class:`SlideMaps`) and its group
(:func:`group_of`). Read by :mod:`tilscore.report.cohort`, which builds them, and by
:mod:`tilscore.report.html`, which renders them (so neither imports the other for them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from tilscore.results import flatten

METADATA_PREFIX = "metadata."
MISSING_GROUP = "(missing)"


@dataclass
class SlideEntry:
    """One slide folder: `summary` (None when incomplete) and `problem` (why incomplete)."""

    slide_id: str
    folder: Path
    summary: dict | None = None
    problem: str = ""

    @functools.cached_property
    def flat(self) -> dict:
        """The summary's scalar fields with dotted keys (the scores.csv row)."""
        return flatten(self.summary) if self.summary else {}


@dataclass
class Cohort:
    """Everything the report shows about `out_dir`."""

    out_dir: Path
    scored: list[SlideEntry] = field(default_factory=list)
    incomplete: list[SlideEntry] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # {input, error} from failures.csv

    def columns(self) -> list[str]:
        """Every scores.csv column present in at least one summary, in first-seen order."""
        seen: dict[str, None] = {}
        for entry in self.scored:
            seen.update(dict.fromkeys(entry.flat))
        return list(seen)

    def metadata_columns(self) -> list[str]:
        """Manifest pass-through columns (``metadata.<name>``), in first-seen order."""
        return [c for c in self.columns() if c.startswith(METADATA_PREFIX)]


def group_of(entry: SlideEntry, column: str | None) -> str:
    """The group name of a slide for `column` (MISSING_GROUP when empty or absent)."""
    if column is None:
        return "all"
    value = entry.flat.get(column)
    return MISSING_GROUP if value is None or value == "" else str(value)


@dataclass
class SlideMaps:
    """Rendered maps of one slide as data URIs ("" when unavailable, with `problem`)."""

    regions_uri: str = ""
    legend: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    density_uri: str = ""
    density_title: str = ""
    density_unit: str = ""
    density_vmax: float = 0.0
    overlay_uri: str = ""
    problem: list[str] = field(default_factory=list)
