"""Reading the score configuration (YAML values → ScoreConfig; unknown keys rejected)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from tilscore.errors import UsageError
from tilscore.score import ScoreConfig


def load_score_config(path: str | Path | None) -> ScoreConfig:
    """ScoreConfig from YAML `path` (None: defaults). Keys may sit under a ``score:`` section."""
    if path is None:
        return ScoreConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise UsageError(f"config not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of keys to values")
    raw = raw.get("score", raw)
    valid = {f.name: f.type for f in dataclasses.fields(ScoreConfig)}
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    try:
        values = {k: float(v) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path}: every score setting must be a number ({exc})") from exc
    return ScoreConfig(**values)
