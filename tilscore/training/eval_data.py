"""Labelled tiles for evaluation, at a model's mpp (sides padded to a multiple of 32)."""

from __future__ import annotations

import numpy as np

from tilscore.errors import UsageError
from tilscore.training.data import SyntheticSource, pad_to_multiple, resample_tile
from tilscore.training.importers.detect import load_folder

SYNTH_EVAL_SEEDS = range(9100, 9104)  # never used for training (train 1000+, val 9000+)
SYNTH_EVAL_TILES = 48


def eval_tiles(data: str, model_mpp: float, *, split: str = "val", mpp: float | None = None):
    """`data`: a labelled-tile folder (any supported format) or ``synthetic``."""
    if split not in ("val", "train", "all"):
        raise UsageError(f"unknown split {split!r}; valid: val, train, all")
    if data == "synthetic":
        src = SyntheticSource("he", model_mpp, SYNTH_EVAL_SEEDS)
        rng = np.random.default_rng(123)
        return [src.sample(rng, 256) for _ in range(SYNTH_EVAL_TILES)]

    tiles = load_folder(data, mpp=mpp)
    if split != "all":
        if not any(t.split for t in tiles):
            raise UsageError(f"{data} defines no train/val split; use --split all")
        tiles = [t for t in tiles if (t.split or "train") == split]
        if not tiles:
            raise UsageError(f"{data} has no {split!r} tiles; use --split all (or another "
                             "split) to evaluate on it")
    return [pad_to_multiple(resample_tile(t, model_mpp)) for t in tiles]
