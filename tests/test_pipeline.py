"""End to end: `tilscore score` on synthetic slides with exact truth (golden tests) and on a
real slide, with the shipped default H&E model; batch failure isolation; bad inputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import shared_path
from tilscore.models.registry import MODELS_DIR
from tilscore.training.metrics import detection_score

pytestmark = pytest.mark.skipif(not (MODELS_DIR / "he-default" / "card.json").exists(),
                                reason="shipped model models/he-default missing")
CLI = [sys.executable, "-m", "tilscore.cli"]
SIZE_PX = 4096  # 1 x 1 mm at 0.25 µm/px


def run(*args, timeout=600):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from tilscore.synth.writer import write_synthetic_slide

    root = tmp_path_factory.mktemp("golden")
    res = write_synthetic_slide(root / "golden.tiff", stain="he", seed=11,
                                size_px=(SIZE_PX, SIZE_PX), mpp=0.25)
    proc = run("score", res.slide_path, "--out", root / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = root / "out" / "golden"
    summary = json.loads((out / "summary.json").read_text())
    return res, out, summary


def _truth_cells(res) -> dict:
    with open(res.cells_path) as fh:
        rows = list(csv.DictReader(fh))
    return {"xy": np.array([[float(r["x_px"]), float(r["y_px"])] for r in rows]),
            "lymph": np.array([r["cell_type"] == "lymphocyte" for r in rows])}


def test_lymphocyte_detection_f1(scored):
    res, out, _ = scored
    truth = _truth_cells(res)
    with open(out / "cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    pred = np.array([[float(r["x_px"]), float(r["y_px"])] for r in rows
                     if r["class"] == "lymphocyte"])
    radius_px = 3.3 / 0.25
    score = detection_score(pred, truth["xy"][truth["lymph"]], radius=radius_px)
    assert score.f1 >= 0.9, score.as_dict()


def test_region_areas_within_5_percent(scored):
    res, _, summary = scored
    for key in ("tissue", "tumour", "stroma"):
        got, want = summary["areas_mm2"][key], res.truth["areas_mm2"][key]
        assert abs(got - want) <= 0.05 * want, (key, got, want)


def test_stromal_tils_and_densities(scored):
    res, _, summary = scored
    assert abs(summary["stromal_til_percent"] - res.truth["stromal_til_percent"]) <= 3.0
    for comp in ("tumour", "stroma"):
        got = summary["densities_per_mm2"]["lymphocyte"][comp]
        want = res.truth["densities_per_mm2"]["lymphocyte"][comp]
        assert abs(got - want) <= 0.10 * want, (comp, got, want)


def test_outputs_are_complete_and_readable(scored):
    import shapely.geometry
    import zarr

    _, out, summary = scored
    for name in ("summary.json", "cells.csv", "cells.geojson", "regions.geojson", "overlay.png"):
        assert (out / name).stat().st_size > 0
    for key in ("slide", "stain", "mpp", "model", "tilscore_version", "areas_mm2", "counts",
                "densities_per_mm2", "stromal_til_percent", "til_score_tiger", "runtime_s"):
        assert key in summary
    assert len(summary["model"]["sha256"]) == 64
    assert summary["precision"] in ("float32", "bfloat16")
    regions = json.loads((out / "regions.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in regions["features"]}
    assert {"tumour", "stroma"} <= names
    assert all(shapely.geometry.shape(f["geometry"]).is_valid for f in regions["features"])
    cells = json.loads((out / "cells.geojson").read_text())
    assert cells["features"][0]["properties"]["objectType"] == "detection"
    group = zarr.open_group(str(out / "maps.zarr"), mode="r")
    assert group.attrs["ome"]["version"] == "0.5"
    # The maps cover the slide (1,024 µm), not the tile grid (5 cores of 224 µm = 1,120 µm).
    assert group["labels/regions/0"].shape == (512, 512)  # 2 µm/px
    grid_um = summary["score_config"]["density_grid_um"]
    assert group.attrs["ome"]["multiscales"][0]["name"] == "til_density"  # the root image
    assert group["0"].shape == (int(np.ceil(1024 / grid_um)),) * 2
    from tests.test_io_writers import assert_opens_in_ome_zarr_readers

    assert_opens_in_ome_zarr_readers(out / "maps.zarr")
    assert not list(out.parent.glob(".*tmp*"))  # no temporary leftovers
    rows = list(csv.DictReader(open(out.parent / "scores.csv")))
    assert len(rows) == 1 and rows[0]["slide"] == "golden"


def test_region_polygons_trace_the_areas_of_the_summary(scored):
    """regions.geojson traces the region map the summary's areas come from (within 2 %),
    clipped to the image, with counter-clockwise exterior rings like the cells'."""
    import shapely.geometry

    from tests.test_io_writers import assert_rings_counter_clockwise

    _, out, summary = scored
    image = shapely.geometry.box(0, 0, SIZE_PX, SIZE_PX)
    features = json.loads((out / "regions.geojson").read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in features} \
        == {"tumour", "stroma", "other"}
    for f in features:
        name = f["properties"]["classification"]["name"]
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid and image.covers(geom)
        assert_rings_counter_clockwise(f["geometry"])
        area_mm2 = geom.area * summary["mpp"] ** 2 * 1e-6
        assert area_mm2 == pytest.approx(f["properties"]["measurements"]["area_mm2"],
                                         rel=1e-4)
        assert area_mm2 == pytest.approx(summary["areas_mm2"][name], rel=0.02), name
    cell = json.loads((out / "cells.geojson").read_text())["features"][0]["geometry"]
    assert_rings_counter_clockwise(cell)


def test_density_map_is_per_tissue_area_and_nan_off_tissue(scored):
    """Each grid cell's density is its counted cells ÷ its tissue area (region-map pixels
    of any tissue class); a cell without tissue is NaN, not 0. Weighted by the tissue, the
    map adds up to the summary's count."""
    import zarr

    from tilscore.scoring.aggregate import tissue_area_grid

    _, out, summary = scored
    root = zarr.open_group(str(out / "maps.zarr"), mode="r")
    labels, dens = root["labels/regions/0"][:], root["0"][:]
    grid_um = summary["score_config"]["density_grid_um"]
    tissue = tissue_area_grid(labels, 2.0, grid_um=grid_um, extent_um=(1024.0, 1024.0))
    assert (tissue > 0).any() and (tissue == 0).any()  # the slide has tissue and glass
    np.testing.assert_array_equal(np.isnan(dens), tissue == 0)
    counted = summary["counts"]["lymphocyte"]["tissue"]
    assert np.nansum(dens.astype(np.float64) * tissue) == pytest.approx(counted, rel=0.01)
    assert tissue.sum() == pytest.approx(summary["areas_mm2"]["tissue"], rel=1e-6)


def test_batch_isolates_failures_and_no_tissue(tmp_path):
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(blank)
    missing = tmp_path / "missing.svs"
    proc = run("score", blank, missing, "--mpp", "0.5", "--out", tmp_path / "out",
               "--device", "cpu")
    assert proc.returncode == 1  # one input failed, the other was scored
    assert "missing.svs" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "out" / "blank" / "summary.json").read_text())
    assert summary["areas_mm2"]["tissue"] == 0 and summary["stromal_til_percent"] is None
    assert any("no tissue" in w for w in summary["warnings"])
    failures = list(csv.DictReader(open(tmp_path / "out" / "failures.csv")))
    assert [f["input"] for f in failures] == [str(missing)]


def test_plain_image_needs_mpp(tmp_path):
    from PIL import Image

    img = tmp_path / "roi.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    proc = run("score", img, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 1 and "--mpp" in proc.stderr


def test_unsupported_stain_is_usage_error(tmp_path):
    from PIL import Image

    img = tmp_path / "roi.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    proc = run("score", img, "--mpp", "0.5", "--stain", "cd20", "--model", "he-default",
               "--out", tmp_path / "out")
    assert proc.returncode == 2 and "does not support stain 'cd20'" in proc.stderr
    proc = run("score", img, "--mpp", "0.5", "--stain", "pas", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "valid: he, cd20, foxp3" in proc.stderr


def test_unwritable_output_is_usage_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run("score", tmp_path / "x.svs", "--out", blocker / "out")
    assert proc.returncode == 2 and "not writable" in proc.stderr


@pytest.mark.real_data
def test_real_svs_scores(tmp_path):
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    proc = run("score", svs, "--out", tmp_path / "out", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out" / "CMU-1-Small-Region"
    for name in ("cells.csv", "cells.geojson", "regions.geojson", "overlay.png", "maps.zarr"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["areas_mm2"]["tissue"] > 0.3  # ~0.66 mm² of tissue on the thumbnail
    assert summary["mpp"] == pytest.approx(0.499, abs=1e-3)
    # region polygons: the summary's areas (were up to 19 % off), inside the image (were
    # up to 3 px past it)
    import shapely.geometry

    image = shapely.geometry.box(0, 0, 2220, 2967)
    for f in json.loads((out / "regions.geojson").read_text())["features"]:
        geom = shapely.geometry.shape(f["geometry"])
        name = f["properties"]["classification"]["name"]
        assert image.covers(geom)
        got = f["properties"]["measurements"]["area_mm2"]
        assert got == pytest.approx(summary["areas_mm2"][name], rel=0.02), name


def test_rerun_skips_done_slides_and_scores_csv_keeps_one_row_each(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        Image.fromarray(np.full((300, 300, 3), 245, np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    args = ("--mpp", "0.5", "--out", out, "--device", "cpu")
    assert run("score", tmp_path / "a.png", *args).returncode == 0
    first = (out / "a" / "summary.json").stat().st_mtime_ns
    proc = run("score", tmp_path / "a.png", tmp_path / "b.png", *args)
    assert proc.returncode == 0 and "a: " in proc.stdout and "already scored" in proc.stdout
    assert (out / "a" / "summary.json").stat().st_mtime_ns == first  # not recomputed
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert sorted(r["slide"] for r in rows) == ["a", "b"]
    summary = json.loads((out / "b" / "summary.json").read_text())
    assert len(summary["config_hash"]) == 16 and "score" in summary["command"]
    assert run("score", tmp_path / "a.png", *args, "--overwrite").returncode == 0
    assert (out / "a" / "summary.json").stat().st_mtime_ns != first
    assert len(list(csv.DictReader(open(out / "scores.csv")))) == 2
