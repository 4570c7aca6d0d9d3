"""Training: a 20-step smoke run on synthetic + a native-format folder, resume, config errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import yaml

from tilscore.errors import UsageError
from tilscore.training.train_config import load_train_config


@pytest.fixture
def native_folder(tmp_path):
    """A small labelled set in tilscore's native format, written from synthetic tiles."""
    from tilscore.synth.scene import SyntheticScene
    from tilscore.training.data import synthetic_tile
    from tilscore.training.importers.native import write_native

    scene = SyntheticScene(2048, 2048, mpp=0.25, seed=5)
    tiles = [synthetic_tile(scene, x, y0=y, size_px=160, ds=2.0) for x, y in ((0, 0), (900, 700),
                                                                              (1500, 300))]
    for k, t in enumerate(tiles):
        t.split = "val" if k == 0 else "train"
    write_native(tmp_path / "native", tiles, name="synthetic-native", licence="generated")
    return tmp_path / "native"


def _config(tmp_path, native_folder, **extra):
    cfg = {
        "name": "smoke", "architecture": "unet-resnet18",
        "architecture_kwargs": {"decoder_channels": [32, 16, 16, 8, 8]},
        "crop_px": 64, "tile_px": 128, "overlap_px": 16, "batch_size": 2,
        "max_steps": 20, "val_every": 10, "checkpoint_every": 10, "workers": 0,
        "device": "cpu",
        "data": [{"kind": "synthetic", "weight": 1.0, "scenes": 1, "val_tiles": 2},
                 {"kind": "auto", "path": str(native_folder), "weight": 1.0}],
        **extra,
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_twenty_step_training_and_resume(tmp_path, native_folder):
    from tilscore.models import load_model
    from tilscore.training.train import train

    cfg = load_train_config(_config(tmp_path, native_folder))
    out = tmp_path / "model"
    card = train(cfg, out, progress=False)
    assert (out / "weights.safetensors").exists() and (out / "checkpoint.pt").exists()
    steps = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(steps) == 20 and all(np.isfinite(float(r["loss_total"])) for r in steps)
    val = list(csv.DictReader(open(out / "validation.csv")))
    assert [int(r["step"]) for r in val] == [10, 20]
    assert 0.1 <= card.heatmap.threshold <= 0.7  # calibrated on validation
    assert card.training["data"][1]["kind"] == "auto"
    net, loaded = load_model(out)
    assert loaded.sha256 == card.sha256
    # Resume continues from step 20 to 24 (checkpoint every 10 → step 20 saved).
    card2 = train(cfg, out, resume=True, max_steps=24, progress=False)
    steps = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in steps][-4:] == [21, 22, 23, 24]
    assert card2.training["steps"] == 24


def test_config_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlearning_rate: 0.1\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: learning_rate"):
        load_train_config(bad)
    bad.write_text("data: [{kind: auto}]\n")
    cfg = load_train_config(bad)
    from tilscore.training.data import build_datasets

    with pytest.raises(UsageError, match="needs a path"):
        build_datasets(cfg)
    with pytest.raises(UsageError, match="config not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_region_at_typed_nuclei_is_the_balanced_accuracy():
    from tilscore.models import ModelCard
    from tilscore.training.eval_model import region_at_nuclei
    from tilscore.training.importers.labelled import CELL_CODES, LabelledTile

    card = ModelCard(name="x", architecture="unet-resnet18")
    region = np.full((32, 32), 2, np.uint8)  # all stroma ...
    region[:, :16] = 1  # ... but the left half tumour
    tumour, stromal = CELL_CODES["tumour"], CELL_CODES["stromal"]
    # 3 tumour nuclei: 2 on the tumour half; 2 stromal nuclei: 1 on the stroma half
    pts = np.array([[2.5, 3.5], [10.5, 30.5], [20.5, 5.5], [25.5, 25.5], [5.5, 5.5],
                    [8.5, 8.5]])
    cls = np.array([tumour, tumour, tumour, stromal, stromal, CELL_CODES["lymphocyte"]])
    tile = LabelledTile(image=np.zeros((32, 32, 3), np.uint8), mpp=0.5, region=None,
                        points_xy=pts, point_cls=cls)
    got = region_at_nuclei([region], [tile], card=card)
    assert got["region_tumour_nuclei_in_tumour"] == pytest.approx(2 / 3)
    assert got["region_stromal_nuclei_in_stroma"] == pytest.approx(1 / 2)
    assert got["region_balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert region_at_nuclei([region], [LabelledTile(
        image=tile.image, mpp=0.5, region=None, points_xy=pts[:3], point_cls=cls[:3])],
        card=card) == {}  # no stromal nuclei: nothing to balance


def test_ema_weights_are_validated_and_saved(tmp_path, native_folder):
    """With ``ema_decay`` the saved weights are the moving average, not the last step's:
    at decay 0.999 six steps move them ~0.6 % as far from the start as plain training."""
    from tilscore.models import load_model
    from tilscore.training.train import train

    def run(name, **extra):
        cfg = load_train_config(_config(tmp_path, native_folder, weights_storage="float32",
                                        val_every=6, checkpoint_every=6, seed=3, **extra))
        train(cfg, tmp_path / name, progress=False)
        return {k: v.float() for k, v in load_model(tmp_path / name)[0].state_dict().items()
                if v.is_floating_point()}

    start = run("start", max_steps=4)
    plain = run("plain", max_steps=6, init_from=str(tmp_path / "start"))
    ema = run("ema", max_steps=6, init_from=str(tmp_path / "start"), ema_decay=0.999)
    moved = sum(float((plain[k] - start[k]).norm()) for k in start)
    ema_moved = sum(float((ema[k] - start[k]).norm()) for k in start)
    assert moved > 0 and 0 < ema_moved < 0.05 * moved


def test_region_model_selection_weighs_real_nuclei_and_synthetic_masks():
    from tilscore.training.train import _selection_score

    val = {"region_balanced_accuracy": 0.8, "dice_tumour": 0.1, "dice_stroma": 0.1,
           "sets": {"synthetic": {"dice_tumour": 0.9, "dice_stroma": 0.7}}}
    assert _selection_score(val, 0.0, "regions") == pytest.approx((0.8 + 0.8) / 2)
    assert _selection_score(val, 0.0, "region_dice") == pytest.approx(0.1)
    only_real = {"region_balanced_accuracy": 0.6, "sets": {}}
    assert _selection_score(only_real, 0.0, "regions") == pytest.approx(0.6)


def test_augmented_training_samples_repeat_with_the_seed():
    """The same seed gives the same augmented samples (albumentations seeded from the
    dataset's generator); another seed gives others."""
    from itertools import islice

    from tilscore.training.data import MixedTileDataset, SyntheticSource

    def first(seed: int, n: int = 3):
        src = SyntheticSource("he", 0.5, range(1000, 1002), scene_px=512)
        ds = MixedTileDataset([(1.0, src.sample)], 128, ("lymphocyte", "other"),
                              sigma_um=1.5, lymph_radius_um=3.5, augment=True, seed=seed)
        return [s["image"].numpy().copy() for s in islice(iter(ds), n)]

    a, b, c = first(0), first(0), first(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
