"""Reading the score configuration (YAML values → ScoreConfig; unknown keys rejected)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tilscore.errors import UsageError
from tilscore.score import ScoreConfig
from tilscore.yaml_config import read_yaml_mapping


def load_score_config(path: str | Path | None) -> ScoreConfig:
    """ScoreConfig from YAML `path` (None: defaults). Keys may sit under a ``score:`` section."""
    if path is None:
        return ScoreConfig()
    path = Path(path)
    raw = read_yaml_mapping(path)
    if "score" in raw:
        beside = sorted(set(raw) - {"score"})
        if beside:
            raise UsageError(f"{path}: key(s) beside the score: section: {', '.join(beside)}")
        raw = raw["score"] or {}
        if not isinstance(raw, dict):
            raise UsageError(f"{path}: the score: section must be a mapping of keys to values")
    valid = {f.name: f.type for f in dataclasses.fields(ScoreConfig)}
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    try:
        values = {k: None if v is None else float(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: every score setting must be a number ({exc})") from exc
    try:
        return ScoreConfig(**values)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc
