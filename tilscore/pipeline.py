"""Scoring one slide and many: open → tissue → tiles → (model, stitch, score) → outputs.

Library functions only (no printing); the CLI reports. Each slide's outputs are
written atomically into ``OUT/<slide_id>/``; a failing slide is recorded in
``failures.csv`` and never stops the others.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tilscore import __version__
from tilscore.errors import TilscoreError
from tilscore.inputs import InputSlide, expand_inputs
from tilscore.io import atomic

log = logging.getLogger(__name__)

DEFAULT_TILE_MPP = 0.5  # µm/px at which tiles are read until a model card says otherwise


@dataclass
class RunResult:
    rows: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


def score_slide(item: InputSlide, out_dir: Path, stain: str = "he", mpp: float | None = None,
                device: str = "auto", workers: int = 2) -> dict:
    """Score one slide into ``out_dir/<slide_id>/`` and return its summary dict."""
    from tilscore.slide import open_slide
    from tilscore.tiles import LoaderStats, TileSpec, iter_tile_batches, tile_grid
    from tilscore.tissue import tissue_mask

    t0 = time.perf_counter()
    with open_slide(item.path, mpp=mpp) as slide:
        mask = tissue_mask(slide)
        spec = TileSpec(mpp=max(DEFAULT_TILE_MPP, slide.mpp))
        grid = tile_grid(slide.dimensions, slide.mpp, spec, mask)
        stats = LoaderStats()
        for _batch in iter_tile_batches(slide, grid, workers=workers, stats=stats):
            pass  # the model engine consumes batches here ([he-model])
        summary = {
            "slide": item.slide_id,
            "path": str(item.path),
            "stain": stain,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "tilscore_version": __version__,
            "areas_mm2": {"tissue": mask.area_mm2},
            "tiles": stats.tiles,
            "failed_tiles": len(stats.failed_tiles),
            "runtime_s": time.perf_counter() - t0,
        }
    atomic.write_json(out_dir / item.slide_id / "summary.json", summary)
    return summary


def flatten(summary: dict, prefix: str = "") -> dict:
    """Scalar fields of a nested summary as a flat dict with dotted keys."""
    flat = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            flat[name] = value
    return flat


def score_inputs(inputs: list[str], out_dir: str | Path, **options) -> RunResult:
    """Score every input; failures are collected, not raised (UsageError still raises)."""
    out_dir = Path(out_dir)
    items = expand_inputs(inputs)
    _ensure_writable(out_dir)
    result = RunResult()
    for item in items:
        try:
            result.rows.append(flatten(score_slide(item, out_dir, **options)))
        except TilscoreError as exc:
            if exc.exit_code == 2:
                raise
            log.debug("slide %s failed", item.path, exc_info=True)
            result.failures.append({"input": str(item.path), "error": str(exc)})
        except (MemoryError, RuntimeError, OSError, ValueError) as exc:
            log.debug("slide %s failed", item.path, exc_info=True)
            result.failures.append(
                {"input": str(item.path), "error": f"{type(exc).__name__}: {exc}"}
            )
    fields = sorted({k for row in result.rows for k in row}, key=_column_order)
    atomic.write_csv(out_dir / "scores.csv", fields, result.rows)
    atomic.write_csv(out_dir / "failures.csv", ["input", "error"], result.failures)
    return result


def _column_order(key: str) -> tuple[int, str]:
    first = ("slide", "stain", "stromal_til_percent", "til_score_tiger")
    return (first.index(key), "") if key in first else (len(first), key)


def _ensure_writable(out_dir: Path) -> None:
    from tilscore.errors import UsageError

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".tilscore-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output folder {out_dir} is not writable: {exc.strerror}") from exc
