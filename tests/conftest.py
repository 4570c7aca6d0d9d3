"""Shared fixtures: paths to ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TILSCORE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (needs ../shared/data beside the repo)")
    return path


@pytest.fixture
def slides_dir() -> Path:
    return shared_path("slides")


def synthetic_he_slides(root: Path, prefix: str, n: int, side_px: int, seed: int) -> list[Path]:
    """`n` small synthetic H&E slides ``root/<prefix><k>.tiff`` (0.25 µm/px, seeds from
    `seed`), for batch tests."""
    from tilscore.synth.writer import write_synthetic_slide

    return [write_synthetic_slide(root / f"{prefix}{k}.tiff", stain="he", seed=seed + k,
                                  size_px=(side_px, side_px), mpp=0.25).slide_path
            for k in range(n)]


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/outputs.json from this run "
                          "(tests/test_golden_outputs.py); only on a commit known to be right")
