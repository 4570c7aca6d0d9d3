"""Reading the score configuration (YAML values → ScoreConfig; unknown keys rejected)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tilscore.errors import UsageError
from tilscore.scoring.score import SCORE_RANGES, ScoreConfig
from tilscore.yaml_config import read_yaml_mapping


def load_score_config(path: str | Path | None) -> ScoreConfig:
    """ScoreConfig from YAML `path` (None: defaults). Keys may sit under a ``score:`` section."""
    if path is None:
        return ScoreConfig()
    path = Path(path)
    raw = read_yaml_mapping(path)
    if "score" in raw:
        beside = sorted(str(k) for k in raw if k != "score")
        if beside:
            raise UsageError(f"{path}: key(s) beside the score: section: {', '.join(beside)}")
        raw = raw["score"] or {}
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: the score: section must be a mapping of keys to values")
    valid = {f.name: f.type for f in dataclasses.fields(ScoreConfig)}
    unknown = sorted(str(k) for k in raw if k not in valid)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    values = {k: _number(v, k, path) for k, v in raw.items()}
    try:
        return ScoreConfig(**values)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def _number(value, key: str, path: Path) -> float | None:
    """A setting's value as a float (None stays None); UsageError naming the key otherwise
    (its range is checked by ScoreConfig)."""
    if value is None:
        return None
    if not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    low, high, unit = SCORE_RANGES[key]
    raise UsageError(f"{path}: {key} must be a number from {low:g} to {high:g} {unit}, "
                     f"got {value!r}")
