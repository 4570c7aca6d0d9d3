"""Synthetic slides: pyramidal TIFF readable by OpenSlide and tifffile, exact truth files,
determinism, block-wise cells and stain appearance."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tilscore.errors import UsageError
from tilscore.synth.scene import LYMPH_RADIUS_UM, SyntheticScene
from tilscore.synth.truth import scene_truth
from tilscore.synth.writer import level_dimensions, write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
SIZE = (3000, 2500)
SEED = 3


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "he_slide"
    return write_synthetic_slide(out, stain="he", seed=SEED, size_px=SIZE)


@pytest.fixture(scope="module")
def he_scene():
    return SyntheticScene(*SIZE, mpp=0.25, stain="he", seed=SEED)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- TIFF -------------------------------------------------------------------------------
def test_openslide_reads_pyramid_mpp_and_pixels(he_slide, he_scene):
    openslide = pytest.importorskip("openslide")
    slide = openslide.OpenSlide(str(he_slide.slide_path))
    try:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count >= 2
        assert slide.dimensions == SIZE
        assert slide.level_dimensions[1] == (750, 625)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        region = np.asarray(slide.read_region((1100, 900), 0, (512, 512)).convert("RGB"))
        level1 = np.asarray(slide.read_region((0, 0), 1, (750, 625)).convert("RGB"))
    finally:
        slide.close()
    assert _mad(region, he_scene.render(1100, 900, width=512, height=512)) <= 3.0
    assert region.std() > 10  # not a blank region
    # Level 1 is the 4x4 average of level 0 (JPEG noise is larger on denser content).
    assert _mad(level1, he_scene.render(0, 0, width=750, height=625, downsample=4)) <= 8.0


def test_tifffile_reads_same_pixels_and_mpp(he_slide):
    tifffile = pytest.importorskip("tifffile")
    openslide = pytest.importorskip("openslide")
    with tifffile.TiffFile(he_slide.slide_path) as tf:
        levels = tf.series[0].levels
        assert len(levels) >= 2
        assert levels[0].shape == (SIZE[1], SIZE[0], 3)
        page = tf.pages[0]
        assert page.is_tiled and page.compression == 7  # JPEG
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        num, den = page.tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(0.25)
        tf_region = levels[0].asarray()[900:1412, 1100:1612]
    slide = openslide.OpenSlide(str(he_slide.slide_path))
    os_region = np.asarray(slide.read_region((1100, 900), 0, (512, 512)).convert("RGB"))
    slide.close()
    assert _mad(tf_region, os_region) <= 1.0


def test_level_dimensions():
    assert level_dimensions(3000, 2500) == [(3000, 2500), (750, 625)]
    assert level_dimensions(16000, 16000) == [(16000, 16000), (4000, 4000), (1000, 1000)]
    assert len(level_dimensions(100_000, 80_000)) == 5


# -- truth ------------------------------------------------------------------------------
def test_truth_areas_plausible(he_slide):
    truth = json.loads(he_slide.truth_path.read_text())
    areas = truth["areas_mm2"]
    slide_mm2 = SIZE[0] * SIZE[1] * 0.25**2 / 1e6
    assert 0.45 <= areas["tissue"] / slide_mm2 <= 0.75
    assert 0.2 <= areas["tumour"] / areas["tissue"] <= 0.55
    assert 0.0 <= areas["other"] / areas["tissue"] <= 0.2
    parts = areas["tumour"] + areas["stroma"] + areas["other"]
    assert parts == pytest.approx(areas["tissue"], rel=0.005)
    for key in ("slide", "stain", "mpp", "counts", "densities_per_mm2", "stromal_til_percent",
                "til_score_tiger", "percent_positive", "seed", "size_px", "generator"):
        assert key in truth
    assert truth == he_slide.truth


def test_truth_counts_match_csv(he_slide):
    truth = he_slide.truth
    rows = _read_csv(he_slide.cells_path)
    assert list(rows[0]) == ["x_px", "y_px", "x_um", "y_um", "class", "compartment",
                             "positive", "cell_type"]
    by = Counter((r["class"], r["compartment"]) for r in rows)
    for cls, per in truth["counts"].items():
        for comp in ("tumour", "stroma", "other"):
            assert per[comp] == by[(cls, comp)], (cls, comp)
        assert per["tissue"] == sum(by[(cls, c)] for c in ("tumour", "stroma", "other"))
        for comp, n in per.items():
            area = truth["areas_mm2"][comp]
            assert truth["densities_per_mm2"][cls][comp] == pytest.approx(n / area)
    assert sum(per["tissue"] for per in truth["counts"].values()) == len(rows)
    assert truth["counts"]["lymphocyte"]["stroma"] > 50
    n_stroma_lymph = by[("lymphocyte", "stroma")]
    stroma_um2 = truth["areas_mm2"]["stroma"] * 1e6
    stil = 100 * n_stroma_lymph * np.pi * LYMPH_RADIUS_UM**2 / stroma_um2
    assert truth["stromal_til_percent"] == pytest.approx(stil)
    assert truth["til_score_tiger"] == pytest.approx(100 * n_stroma_lymph * 64 / stroma_um2)
    assert truth["percent_positive"] is None


def test_truth_lymphocyte_density_close_to_knob():
    scene = SyntheticScene(8000, 8000, seed=5, lymphocyte_clustering=0.0)
    truth = scene_truth(scene)
    dens = truth["densities_per_mm2"]["lymphocyte"]
    assert dens["stroma"] == pytest.approx(1500, rel=0.1)
    assert dens["tumour"] == pytest.approx(300, rel=0.2)


def test_area_integration_accuracy(he_scene):
    coarse, fine = he_scene.label_areas_mm2(2.0), he_scene.label_areas_mm2(1.0)
    for key in ("tissue", "tumour", "stroma"):
        assert coarse[key] == pytest.approx(fine[key], rel=0.005)


def test_ihc_truth_classes_and_percent_positive(tmp_path):
    result = write_synthetic_slide(tmp_path / "fx", stain="foxp3", seed=1, size_px=(1024, 1024))
    truth = result.truth
    assert set(truth["counts"]) == {"foxp3_positive", "negative", "lymphocyte"}
    rows = _read_csv(result.cells_path)
    positive = sum(r["class"] == "foxp3_positive" for r in rows)
    assert positive == truth["counts"]["foxp3_positive"]["tissue"]
    assert all(r["cell_type"] == "lymphocyte" for r in rows if r["positive"] == "1")
    assert truth["percent_positive"] == pytest.approx(100 * positive / len(rows))


# -- determinism and block-wise cells ------------------------------------------------------
def test_same_seed_same_slide_different_seed_different(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    a = write_synthetic_slide(tmp_path / "a", seed=7, size_px=(1024, 1024))
    b = write_synthetic_slide(tmp_path / "b", seed=7, size_px=(1024, 1024))
    c = write_synthetic_slide(tmp_path / "c", seed=8, size_px=(1024, 1024))
    strip = ("slide",)
    ta, tb, tc = ({k: v for k, v in r.truth.items() if k not in strip} for r in (a, b, c))
    assert ta == tb and ta != tc
    assert a.cells_path.read_bytes() == b.cells_path.read_bytes()
    pa, pb, pc = (tifffile.imread(r.slide_path) for r in (a, b, c))
    assert np.array_equal(pa, pb)
    assert not np.array_equal(pa, pc)


def test_cells_blockwise_union_equals_whole(he_scene):
    whole = he_scene.cells(0, 0, x1=SIZE[0], y1=SIZE[1])
    xs, ys = [0, 777, 1234.5, 2048, SIZE[0]], [0, 1024, 1500.25, SIZE[1]]
    parts = [he_scene.cells(x0, y0, x1=x1, y1=y1)
             for x0, x1 in zip(xs[:-1], xs[1:], strict=True)
             for y0, y1 in zip(ys[:-1], ys[1:], strict=True)]
    union = {k: np.concatenate([p[k] for p in parts]) for k in whole}

    def ordered(cells):
        order = np.lexsort((cells["x_px"], cells["y_px"]))
        return {k: v[order] for k, v in cells.items()}

    whole, union = ordered(whole), ordered(union)
    assert whole["x_px"].size == union["x_px"].size > 500
    for key in whole:
        assert np.array_equal(whole[key], union[key]), key
    pts = np.round(np.stack([whole["x_px"], whole["y_px"]], 1), 3)
    assert len(np.unique(pts, axis=0)) == len(pts)  # no duplicates


def test_nuclei_do_not_overlap_and_compartments_match_labels(he_scene):
    from scipy.spatial import cKDTree

    cells = he_scene.cells(0, 0, x1=SIZE[0], y1=SIZE[1])
    pts = np.stack([cells["x_px"], cells["y_px"]], 1)
    i, j = cKDTree(pts).query_pairs(60, output_type="ndarray").T
    dist = np.hypot(*(pts[i] - pts[j]).T)
    assert np.all(dist >= cells["major_px"][i] + cells["major_px"][j])
    codes = {"tumour": 1, "stroma": 2, "other": 3}
    labels = np.array([he_scene.region_labels(int(x), int(y), width=1, height=1)[0, 0]
                       for x, y in pts[:400]])
    expected = np.array([codes[c] for c in cells["compartment"][:400]])
    assert np.mean(labels == expected) > 0.97


def test_render_downsample_is_area_average(he_scene):
    full = he_scene.render(1000, 800, width=256, height=256).astype(np.float64)
    half = he_scene.render(1000, 800, width=128, height=128, downsample=2).astype(np.float64)
    averaged = full.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - averaged).max() <= 1.0
    tile = he_scene.render(1128, 928, width=64, height=64)
    assert np.array_equal(tile, full[128:192, 128:192].astype(np.uint8))
    labels = he_scene.region_labels(0, 0, width=300, height=250, downsample=10)
    assert labels.shape == (250, 300) and set(np.unique(labels)) <= {0, 1, 2, 3}


# -- appearance ---------------------------------------------------------------------------
def _nucleus_and_background(scene: SyntheticScene, cls_mask_fn, x0=0, y0=0, size=2048):
    """Mean RGB at nuclei centres (disc r=2 µm) selected by cls_mask_fn, per cell."""
    img = scene.render(x0, y0, width=size, height=size).astype(np.float64)
    cells = scene.cells(x0 + 40, y0 + 40, x1=x0 + size - 40, y1=y0 + size - 40)
    sel = cls_mask_fn(cells)
    r_px = int(2.0 / scene.mpp)
    yy, xx = np.mgrid[-r_px:r_px + 1, -r_px:r_px + 1]
    disc = yy**2 + xx**2 <= r_px**2
    means = []
    for x, y in zip(cells["x_px"][sel], cells["y_px"][sel], strict=True):
        cx, cy = int(round(x - x0)), int(round(y - y0))
        patch = img[cy - r_px:cy + r_px + 1, cx - r_px:cx + r_px + 1]
        means.append(patch[disc].mean(axis=0))
    return img, cells, np.array(means).reshape(-1, 3)


def test_he_lymphocytes_darker_than_stroma(he_scene):
    img, cells, lymph = _nucleus_and_background(he_scene, lambda c: c["cls"] == "lymphocyte")
    assert len(lymph) > 10
    labels = he_scene.region_labels(0, 0, width=2048, height=2048)
    stroma = img[labels == 2].mean(axis=0)
    assert lymph.mean(axis=1).mean() < stroma.mean() - 60
    assert stroma[1] < stroma[0]  # eosin: pink (green absorbed most)


def test_foxp3_positive_brown_negative_blue():
    scene = SyntheticScene(*SIZE, stain="foxp3", seed=SEED, positive_fraction=0.5)
    _, _, pos = _nucleus_and_background(scene, lambda c: c["positive"])
    _, _, neg = _nucleus_and_background(
        scene, lambda c: (c["cls"] == "lymphocyte") & ~c["positive"])
    assert len(pos) > 5 and len(neg) > 5
    assert np.all(pos[:, 0] > pos[:, 2])  # DAB brown: R > B
    assert np.all(neg[:, 2] > neg[:, 0])  # haematoxylin blue: B > R


def test_cd20_membrane_ring_brown_around_blue_nucleus():
    scene = SyntheticScene(*SIZE, stain="cd20", seed=SEED, positive_fraction=0.5)
    img, cells, centre = _nucleus_and_background(scene, lambda c: c["positive"])
    assert np.all(centre[:, 2] > centre[:, 0])  # blue nucleus
    sel = cells["positive"]
    ring_r = (LYMPH_RADIUS_UM + 0.6) / scene.mpp
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for x, y in zip(cells["x_px"][sel], cells["y_px"][sel], strict=True):
        px = np.round(x + ring_r * np.cos(angles)).astype(int)
        py = np.round(y + ring_r * np.sin(angles)).astype(int)
        ring = img[py, px].mean(axis=0)
        assert ring[0] > ring[2]  # brown membrane


def test_pen_marks_and_blur():
    scene = SyntheticScene(8000, 8000, seed=2, pen_marks=True)
    pen, tissue = scene.pen_mask(8.0), scene.tissue_mask(8.0)
    assert pen.shape == tissue.shape == (250, 250)
    assert 0.01 < pen.mean() < 0.5
    assert not np.any(pen & tissue)
    plain = SyntheticScene(8000, 8000, seed=2).tissue_mask(8.0)
    assert np.array_equal(tissue, plain & ~pen)  # same layout, pen-covered tissue removed
    assert np.any(plain & pen)  # the ink crosses tissue
    cells = scene.cells(0, 0, x1=8000, y1=8000)
    iy = (cells["y_px"] * 0.25 / 8).astype(int)
    ix = (cells["x_px"] * 0.25 / 8).astype(int)
    assert np.mean(pen[iy, ix]) < 0.02  # cells under ink are left out (edge pixels aside)
    iy, ix = np.argwhere(pen)[len(np.argwhere(pen)) // 2]
    inked = scene.render(ix * 32, iy * 32, width=16, height=16).mean()
    assert inked < 200
    sharp = SyntheticScene(*SIZE, seed=SEED).render(1000, 900, width=256, height=256)
    blurred = SyntheticScene(*SIZE, seed=SEED, blur_sigma_px=6).render(
        1000, 900, width=256, height=256)

    def detail(im):
        return np.abs(np.diff(im.astype(float), 2, axis=0)).mean()

    assert detail(blurred) < 0.5 * detail(sharp)


def test_bad_arguments():
    with pytest.raises(UsageError, match="valid"):
        SyntheticScene(1000, 1000, stain="pas")
    with pytest.raises(UsageError, match="lymphocyte_density_stroma_per_mm2"):
        SyntheticScene(1000, 1000, lymph_density=3)
    with pytest.raises(UsageError):
        write_synthetic_slide("/tmp/never", size_px=(1000, 1000), tile_px=500)


# -- memory -------------------------------------------------------------------------------
def _peak_rss_mb(size_px: tuple[int, int], out: Path) -> float:
    code = textwrap.dedent(f"""
        from tilscore.synth.writer import write_synthetic_slide
        write_synthetic_slide({str(out)!r}, size_px={size_px!r}, seed=1)
        # VmHWM, not ru_maxrss: Linux carries the parent's (pytest's) high-water mark
        # across fork+exec into ru_maxrss.
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
        print(int(hwm.split()[1]) / 1024)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def test_peak_memory_bounded_for_wide_slide(tmp_path):
    # 16k px wide: memory is dominated by fixed costs, not by the slide size.
    assert _peak_rss_mb((16384, 1024), tmp_path / "wide") < 500


@pytest.mark.slow
def test_peak_memory_bounded_for_40k_slide(tmp_path):
    assert _peak_rss_mb((40000, 40000), tmp_path / "big") < 1500
