"""Score maths on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tilscore.scoring.score import (
    RegionAreas,
    ScoreConfig,
    counts_by_compartment,
    densities,
    density_map,
    fraction_near,
    stromal_tils,
    tumour_bulk,
)


def _areas(stroma_in_bulk=0.5, nuclei_mm2=0.01):
    return RegionAreas(tumour=1.0, stroma=0.8, other=0.2, stroma_in_bulk=stroma_in_bulk,
                       bulk=1.5, nuclear_area_in_bulk_stroma_mm2=nuclei_mm2)


def test_stromal_til_percent_by_hand():
    cfg = ScoreConfig(lymphocyte_nucleus_diameter_um=7.0, tiger_cell_area_um2=64.0)
    # 1000 lymphocytes x π·3.5² µm² = 38,484.5 µm² over 0.5 mm² = 500,000 µm² → 7.697 %
    res = stromal_tils(1000, _areas(), cfg=cfg)
    assert res["stromal_til_percent"] == pytest.approx(100 * 1000 * math.pi * 3.5**2 / 5e5)
    assert res["stromal_til_percent"] == pytest.approx(7.6969, abs=1e-3)
    # TIGER: 100 x 1000 x 64 / 500,000 = 12.8
    assert res["til_score_tiger"] == pytest.approx(12.8)
    # segmented: 0.01 mm² of nuclei over 0.5 mm² = 2 %
    assert res["stromal_til_percent_segmented"] == pytest.approx(2.0)
    assert res["til_parts"]["lymphocytes_in_bulk_stroma"] == 1000
    # a cell model without a nucleus channel measured no nuclear area: null, not 0 %
    unsegmented = stromal_tils(1000, _areas(), cfg=cfg, nuclei_segmented=False)
    assert unsegmented["stromal_til_percent_segmented"] is None
    assert unsegmented["stromal_til_percent"] == res["stromal_til_percent"]


def test_stromal_tils_undefined_without_stroma_and_capped():
    cfg = ScoreConfig()
    assert stromal_tils(10, _areas(stroma_in_bulk=0.0), cfg=cfg)["stromal_til_percent"] is None
    assert stromal_tils(10**7, _areas(), cfg=cfg)["stromal_til_percent"] == 100.0


def test_counts_and_densities():
    names = ["lymphocyte", "other"]
    cls = np.array([0, 0, 0, 1, 0])
    comp = np.array(["stroma", "stroma", "tumour", "tumour", "other"])
    counts = counts_by_compartment(names, cls, compartment=comp)
    assert counts["lymphocyte"] == {"tumour": 1, "stroma": 2, "other": 1, "tissue": 4}
    assert counts["other"] == {"tumour": 1, "stroma": 0, "other": 0, "tissue": 1}
    dens = densities(counts, _areas())
    assert dens["lymphocyte"]["stroma"] == pytest.approx(2 / 0.8)
    assert dens["lymphocyte"]["tissue"] == pytest.approx(4 / 2.0)
    zero = RegionAreas(0, 0, 0, 0, 0, 0)
    assert densities(counts, zero)["lymphocyte"]["tumour"] is None


def test_tumour_bulk_bridges_nests_but_not_far_stroma():
    frac = np.zeros((60, 60), np.float32)
    frac[10:20, 10:20] = 1.0  # two nests 10 px (80 µm) apart ...
    frac[10:20, 30:40] = 1.0
    bulk = tumour_bulk(frac, coarse_mpp=8.0, radius_um=80.0)
    assert bulk[15, 25]  # ... the stroma between them is in the bulk
    assert not bulk[50, 50]  # far away stroma is not
    assert not tumour_bulk(np.zeros((5, 5)), coarse_mpp=8.0, radius_um=80.0).any()


def test_fraction_near_tumour():
    tumour = np.zeros((20, 20), bool)
    tumour[:, :5] = True  # tumour in x < 40 µm at 8 µm/px
    pts = np.array([[50.0, 10.0], [85.0, 10.0], [150.0, 10.0]])  # 10, 45, 110 µm away
    assert fraction_near(pts, tumour, mask_mpp=8.0, distance_um=50.0) == pytest.approx(2 / 3)
    assert fraction_near(np.zeros((0, 2)), tumour, mask_mpp=8.0, distance_um=50.0) is None


def test_density_map_per_mm2_of_tissue_and_nan_without_tissue():
    pts = np.array([[10.0, 10.0], [20.0, 30.0], [150.0, 10.0], [250.0, 50.0]])
    tissue = np.array([[0.01, 0.0025, 0.0]])  # mm²: a full cell, a quarter, none
    dmap = density_map(pts, tissue, grid_um=100.0)
    assert dmap.shape == (1, 3) and dmap.dtype == np.float32
    assert dmap[0, 0] == pytest.approx(2 / 0.01)
    assert dmap[0, 1] == pytest.approx(1 / 0.0025)  # divided by its tissue, not by 0.01 mm²
    assert np.isnan(dmap[0, 2])  # no tissue: not measured, not 0 (a point there is lost)
    empty = density_map(np.zeros((0, 2)), tissue, grid_um=100.0)
    assert empty[0, 0] == 0 and np.isnan(empty[0, 2])


def test_density_map_edge_cells_divide_by_their_tissue_inside_the_slide():
    from tilscore.scoring.aggregate import tissue_area_grid

    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1050.0, (200_000, 2))  # uniform on a 1050 µm square: 181,406 /mm²
    labels = np.ones((525, 525), np.uint8)  # all tissue at 2 µm/px
    tissue = tissue_area_grid(labels, 2.0, grid_um=100.0, extent_um=(1050.0, 1050.0))
    dmap = density_map(pts, tissue, grid_um=100.0)
    assert dmap.shape == (11, 11)
    truth = 200_000 / 1.05**2
    assert np.allclose(dmap, truth, rtol=0.1)  # the cut last row/column and corner too


def test_tissue_area_grid_counts_region_pixels_by_their_centre():
    from tilscore.scoring.aggregate import tissue_area_grid

    rng = np.random.default_rng(1)
    labels = (rng.random((203, 311)) < 0.4).astype(np.uint8) * rng.integers(1, 4, (203, 311))
    labels[:50, :120] = 0  # glass: these grid cells hold no tissue
    mpp, grid = 2.0, 30.0  # 15 px per grid cell; the last row and column are cut
    extent = (311 * mpp - 1.0, 203 * mpp - 1.5)  # the last pixel straddles the slide edge
    got = tissue_area_grid(labels, mpp, grid_um=grid, extent_um=extent, band_rows=16)
    rows, cols = int(np.ceil(extent[1] / grid)), int(np.ceil(extent[0] / grid))
    want = np.zeros((rows, cols))
    for i, j in zip(*np.nonzero(labels), strict=True):
        want[min(int((i + 0.5) * mpp // grid), rows - 1),
             min(int((j + 0.5) * mpp // grid), cols - 1)] += (mpp * 1e-3) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got.sum() == pytest.approx((labels > 0).sum() * (mpp * 1e-3) ** 2)  # as the summary
    assert (got[:3, :4] == 0).all()
    fine = tissue_area_grid(labels, mpp, grid_um=1.0, extent_um=extent)  # grid finer than a pixel
    assert fine.sum() == pytest.approx(got.sum())


def test_score_yaml_documents_the_defaults_and_ihc_overrides_are_checked(tmp_path):
    from pathlib import Path

    from tilscore.errors import UsageError
    from tilscore.scoring.score_config import load_score_config

    shipped = load_score_config(Path(__file__).parents[1] / "configs" / "score.yaml")
    assert shipped == ScoreConfig()  # the file states the defaults, nothing else
    cfg = ScoreConfig(foxp3_dab_threshold_od=0.8, dab_bin_moderate_od=0.5)
    assert cfg.ihc_overrides("foxp3", (0.2, 0.4, 0.6)) == {
        "dab_threshold_od": 0.8, "bins_od": (0.2, 0.5, 0.6)}
    assert cfg.ihc_overrides("cd20", (0.2, 0.4, 0.6)) == {"bins_od": (0.2, 0.5, 0.6)}
    assert ScoreConfig().ihc_overrides("cd20", (0.2, 0.4, 0.6)) == {}
    with pytest.raises(UsageError, match="must increase"):
        ScoreConfig(dab_bin_weak_od=0.5).ihc_overrides("cd20", (0.2, 0.4, 0.6))
    with pytest.raises(UsageError, match="cd20_dab_threshold_od must be a number from 0.01"):
        ScoreConfig(cd20_dab_threshold_od=0.0)
    with pytest.raises(UsageError, match="must increase"):  # at load, for any stain's run
        ScoreConfig(dab_bin_strong_od=0.3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("score:\n  foxp3_threshold: 1\n")
    with pytest.raises(UsageError, match="unknown key.*foxp3_threshold"):
        load_score_config(bad)
    for text, message in (("score:\n  density_grid_um: 0\n", "density_grid_um must be a num"),
                          ("score:\n  tiger_cell_area_um2: -64\n", "tiger_cell_area_um2"),
                          ("score:\n  near_tumour_um: -1\n", "near_tumour_um must be a num"),
                          ("score:\n  - 1\n", "score: section must be a mapping"),
                          ("score:\n  coarse_mpp: 8\ndensity_grid_um: 50\n",
                           "beside the score: section: density_grid_um")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=message):
            load_score_config(bad)
    bad.write_text("score:\n")  # an empty section, like an empty file: the defaults
    assert load_score_config(bad) == ScoreConfig()


@pytest.mark.parametrize("text, message", [
    ("density_grid_um: 1.0e-6", "density_grid_um must be a number from 10 to 10000 µm, got 1e-06"),
    ("density_grid_um: .inf", "density_grid_um must be a number from 10 to 10000 µm, got inf"),
    ("near_tumour_um: .nan", "near_tumour_um must be a number from 0 to 2000 µm, got nan"),
    ("coarse_mpp: -.inf", "coarse_mpp must be a number from 2 to 64 µm/px, got -inf"),
    ("bulk_closing_radius_um: 1.0e9", "bulk_closing_radius_um must be a number from 0 to 2000"),
    ("tiger_cell_area_um2: true", "tiger_cell_area_um2 must be a number from 1 to 1000 µm², "
                                  "got True"),
    ("lymphocyte_nucleus_diameter_um: seven", "lymphocyte_nucleus_diameter_um must be a number"),
    ("foxp3_dab_threshold_od: .inf", "foxp3_dab_threshold_od must be a number from 0.01 to 6"),
    ("dab_bin_weak_od: 1.0e300", "dab_bin_weak_od must be a number from 0.01 to 6 OD"),
    ("1: 2", "unknown key(s) 1; valid:"),
])
def test_every_score_setting_is_range_checked_when_read(tmp_path, text, message):
    """.inf and a 1e-6 µm density grid passed the check and failed every slide after the
    model pass (a 233 PiB array): every key has a finite accepted range, named in the
    one-line error with the file."""
    from tilscore.errors import UsageError
    from tilscore.scoring.score_config import load_score_config

    path = tmp_path / "cfg.yaml"
    path.write_text("score:\n  " + text + "\n", encoding="utf-8")
    with pytest.raises(UsageError) as err:
        load_score_config(path)
    assert str(err.value) == f"{path}: {message}" or str(err.value).startswith(
        f"{path}: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_score_ranges_hold_the_shipped_defaults():
    import dataclasses

    from tilscore.scoring.score import SCORE_RANGES

    assert set(SCORE_RANGES) == {f.name for f in dataclasses.fields(ScoreConfig)}
    for name, (low, high, _) in SCORE_RANGES.items():
        default = getattr(ScoreConfig(), name)
        assert default is None or low <= default <= high, name
