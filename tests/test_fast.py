"""The fast mode (tilscore.engine.fast): which tiles the cell pass runs on, a region-only model
through the engine and the trainer, and `score --mode fast` end to end on a synthetic
slide with exact truth (the shipped he-regions + he-default models)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tilscore.engine.fast import covered, mask_unsearched
from tilscore.models.card import ModelCard
from tilscore.models.registry import MODELS_DIR
from tilscore.prepare.tiles import TileSpec, select_tiles, tile_grid
from tilscore.prepare.tissue import TissueMask

CLI = [sys.executable, "-m", "tilscore.cli"]
SHIPPED = all((MODELS_DIR / m / "card.json").exists() for m in ("he-default", "he-regions"))


def test_select_tiles_keeps_only_cores_touching_the_mask():
    # 1 µm/px slide of 1000 x 600 µm; cores of 100 µm at 1 µm/px: 10 x 6 cores.
    grid = tile_grid((1000, 600), 1.0, spec=TileSpec(mpp=1.0, tile_px=120, overlap_px=10))
    need = np.zeros((75, 125), bool)  # 8 µm/px
    need[5, 30] = True  # µm [40, 48) x [240, 248): core (row 0, col 2)
    need[37, 62] = True  # µm [296, 304) x [496, 504): straddles rows 2-3 and cols 4-5
    sub = select_tiles(grid, TissueMask(need, 8.0))
    got = sorted(zip(sub.rows.tolist(), sub.cols.tolist(), strict=True))
    assert got == [(0, 2), (2, 4), (2, 5), (3, 4), (3, 5)]
    assert sub.n_cols == grid.n_cols and len(sub.tissue_fraction) == len(sub)


def test_density_map_is_nan_where_no_cells_were_searched():
    grid = tile_grid((1000, 600), 1.0, spec=TileSpec(mpp=1.0, tile_px=120, overlap_px=10))
    sub = select_tiles(grid, TissueMask(np.eye(1, 125, 30, dtype=bool).reshape(1, 125), 8.0))
    assert covered(sub, np.array([[250.0, 50.0], [50.0, 50.0], [-5.0, 10.0]])).tolist() == [
        True, False, False]
    dens = mask_unsearched(np.ones((6, 10), np.float32), sub, grid_um=100.0)
    assert np.isfinite(dens).sum() == 1 and dens[0, 2] == 1.0


def test_region_only_model_predicts_regions_at_the_map_mpp_and_no_cells(tmp_path):
    from tilscore.engine.infer import Predictor, predict_slide
    from tilscore.models import create_model
    from tilscore.slide import open_slide

    card = ModelCard(name="r", architecture="unet-resnet18", input_mpp=2.0, tile_px=128,
                     overlap_px=16, cell_classes=(), nucleus_mask=False,
                     architecture_kwargs={"decoder_channels": [32, 16, 16, 8, 8]})
    assert card.out_channels == 4
    torch.manual_seed(0)
    net = create_model(card.architecture, card.out_channels, **card.architecture_kwargs)
    predictor = Predictor(net.eval(), card, torch.device("cpu"))
    assert predictor.region_factor == 1  # already at the 2 µm/px of the region map
    img = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    slide = open_slide(img, mpp=0.5)
    grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(2.0, 128, 16))
    pred = predict_slide(slide, grid, predictor=predictor, store_path=tmp_path / "c.zarr")
    assert len(pred.cells["x_px"]) == 0
    assert pred.canvas.mpp == 2.0 and pred.canvas.shape == (3 * 96, 3 * 96)  # 200 px / 96


def test_region_only_training_and_partial_init(tmp_path):
    """A region-only config trains, selects by Dice, and starts from a multi-task model
    with its head re-initialised (everything else copied)."""
    from tilscore.models import load_model
    from tilscore.training.train import train
    from tilscore.training.train_config import TrainConfig

    base = dict(architecture="unet-resnet18", crop_px=64, tile_px=128, overlap_px=16,
                architecture_kwargs={"decoder_channels": [32, 16, 16, 8, 8]},
                batch_size=2, val_every=2, workers=0, augment=False, warmup_steps=1,
                data=[{"kind": "synthetic", "val_tiles": 2, "scenes": 1}])
    src = train(TrainConfig(name="src", input_mpp=1.0, **base), tmp_path / "src",
                max_steps=2, progress=False)
    with pytest.raises(ValueError, match="region_dice"):
        TrainConfig(name="regions", cell_classes=(), nucleus_mask=False, **base)
    cfg = TrainConfig(name="regions", input_mpp=2.0, cell_classes=(), nucleus_mask=False,
                      select_by="region_dice", init_from=str(tmp_path / "src"),
                      data=[{"kind": "synthetic", "val_tiles": 2, "scenes": 1,
                             "scene_px": 4096}],
                      **{k: v for k, v in base.items() if k != "data"})
    card = train(cfg, tmp_path / "regions", max_steps=2, progress=False)
    assert card.out_channels == 4 and card.cell_classes == ()
    assert "dice_tumour" in card.metrics["validation"]
    assert card.metrics["validation"]["sweep_f1"] == {}
    net, _ = load_model(tmp_path / "regions")
    src_net, _ = load_model(tmp_path / "src")
    enc = "backbone.encoder.conv1.weight"
    assert src.out_channels == 7
    assert net.state_dict()[enc].shape == src_net.state_dict()[enc].shape


def run(*args, timeout=900):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_fast_mode_is_for_he_only(tmp_path):
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    proc = run("score", img, "--mpp", "0.5", "--stain", "cd20", "--mode", "fast",
               "--out", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "H&E" in proc.stderr
    proc = run("score", img, "--mpp", "0.5", "--mode", "quick", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "valid: full, fast" in proc.stderr


@pytest.fixture(scope="module")
def fast_scored(tmp_path_factory):
    from tilscore.synth.writer import write_synthetic_slide

    root = tmp_path_factory.mktemp("fast")
    res = write_synthetic_slide(root / "golden.tiff", stain="he", seed=11,
                                size_px=(4096, 4096), mpp=0.25)
    proc = run("score", res.slide_path, "--out", root / "out", "--device", "cpu",
               "--mode", "fast", "--no-report")
    assert proc.returncode == 0, proc.stderr
    out = root / "out" / "golden"
    return res, out, json.loads((out / "summary.json").read_text())


@pytest.mark.skipif(not SHIPPED, reason="shipped models he-default / he-regions missing")
def test_fast_mode_regions_and_stromal_tils_match_truth(fast_scored):
    res, _, summary = fast_scored
    assert summary["mode"] == "fast"
    assert summary["fast"]["region_model"]["name"] == "he-regions"
    for key in ("tissue", "tumour", "stroma"):
        got, want = summary["areas_mm2"][key], res.truth["areas_mm2"][key]
        assert abs(got - want) <= 0.05 * want, (key, got, want)
    assert abs(summary["stromal_til_percent"] - res.truth["stromal_til_percent"]) <= 3.0
    # The synthetic tumour bulk is the whole tissue, so bulk stroma is all stroma.
    got = summary["densities_per_mm2"]["lymphocyte"]["stroma_in_tumour_bulk"]
    want = res.truth["densities_per_mm2"]["lymphocyte"]["stroma"]
    assert abs(got - want) <= 0.10 * want, (got, want)
    # What was not searched is null, not zero.
    assert summary["counts"]["lymphocyte"]["tumour"] is None
    assert summary["densities_per_mm2"]["lymphocyte"]["tissue"] is None
    assert summary["stromal_lymphocytes_near_tumour_fraction"] is None


@pytest.mark.skipif(not SHIPPED, reason="shipped models he-default / he-regions missing")
def test_fast_mode_finds_the_stromal_lymphocytes(fast_scored):
    from tilscore.training.metrics import detection_score

    res, out, summary = fast_scored
    with open(res.cells_path) as fh:
        truth = np.array([[float(r["x_px"]), float(r["y_px"])] for r in csv.DictReader(fh)
                          if r["cell_type"] == "lymphocyte" and r["compartment"] == "stroma"])
    with open(out / "cells.csv") as fh:
        pred = np.array([[float(r["x_px"]), float(r["y_px"])] for r in csv.DictReader(fh)
                         if r["class"] == "lymphocyte" and r["compartment"] == "stroma"])
    score = detection_score(pred, truth, radius=3.3 / 0.25)
    assert score.f1 >= 0.9, score.as_dict()
    assert summary["fast"]["cell_tiles"] <= summary["fast"]["cell_tiles_full_mode"]
    import zarr

    dens = zarr.open_group(str(out / "maps.zarr"), mode="r")["0"][:]  # the density map
    assert np.isfinite(dens).any()


@pytest.mark.skipif(not SHIPPED, reason="shipped models he-default / he-regions missing")
def test_region_model_must_have_the_region_map_codes(tmp_path):
    from tilscore.engine.load import fast_region_model
    from tilscore.errors import UsageError

    assert fast_region_model("full", "cd20") is None
    assert fast_region_model("fast", "he") == "he-regions"
    card = json.loads((MODELS_DIR / "he-regions" / "card.json").read_text())
    card["region_classes"] = ["background", "stroma", "tumour", "other"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(UsageError, match="not \\['background', 'tumour'"):
        fast_region_model("fast", "he", region_model=str(tmp_path))


def test_unknown_decode_is_refused_before_any_work(tmp_path):
    proc = run("score", tmp_path / "missing.tiff", "--decode", "gpu", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "valid: auto, host, device" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()
