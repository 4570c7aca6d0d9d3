"""Output writers: cells.csv, cells/regions GeoJSON, maps.zarr (OME-Zarr 0.5), overlay.png,
and their atomicity (a failed write leaves neither a final nor a temporary file)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from tilscore.io.cells import write_cells_csv
from tilscore.io.colors import CLASS_COLORS
from tilscore.io.geojson import mask_to_multipolygon, write_cells_geojson, write_regions_geojson
from tilscore.io.ome_zarr import atomic_dir, write_ome_zarr
from tilscore.io.overlay import write_overlay_png

HEADER = ["x_px", "y_px", "x_um", "y_um", "class", "compartment", "score"]
REGIONS = {1: "tumour", 2: "stroma", 3: "other"}


def _cells(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(0, 50_000, n), rng.uniform(0, 40_000, n)
    return {"x_px": x, "y_px": y, "x_um": x * 0.25, "y_um": y * 0.25,
            "class": rng.choice(np.array(["lymphocyte", "tumour", "other"]), n),
            "compartment": rng.choice(np.array(["tumour", "stroma", "other"]), n),
            "score": rng.uniform(0, 1, n).astype(np.float32)}


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- cells.csv -------------------------------------------------------------------------

def test_cells_csv_round_trip(tmp_path):
    cells = _cells(1000)
    cells["x_px"][:4] = [0.0, -3.25, 12.5, 1e6]  # zero, negative, large
    path = tmp_path / "cells.csv"
    write_cells_csv(path, cells, chunk_rows=97)  # several chunks
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == HEADER
        rows = list(reader)
    assert len(rows) == 1000
    for col, tol in (("x_px", 0.005), ("y_px", 0.005), ("x_um", 0.005), ("score", 0.0005)):
        got = np.array([float(r[HEADER.index(col)]) for r in rows])
        np.testing.assert_allclose(got, cells[col], rtol=0, atol=tol + 1e-9)
    assert [r[4] for r in rows] == cells["class"].tolist()
    assert [r[5] for r in rows] == cells["compartment"].tolist()
    assert rows[1][0] == "-3.25" and rows[3][0] == "1000000.00"
    # same text as printf-style formatting (random values, so no exact ties)
    v = [cells[c][10].item() for c in HEADER]
    ref = f"{v[0]:.2f},{v[1]:.2f},{v[2]:.2f},{v[3]:.2f},{v[4]},{v[5]},{v[6]:.3f}"
    assert ",".join(rows[10]) == ref


def test_cells_csv_empty_and_nan(tmp_path):
    path = tmp_path / "cells.csv"
    write_cells_csv(path, {k: v[:0] for k, v in _cells(5).items()})
    assert path.read_text() == ",".join(HEADER) + "\n"
    cells = _cells(3)
    cells["score"] = np.array([np.nan, 0.5, np.inf], np.float32)
    write_cells_csv(path, cells)
    scores = [r["score"] for r in csv.DictReader(open(path))]
    assert scores == ["nan", "0.500", "nan"]


def test_cells_csv_rejects_bad_input(tmp_path):
    cells = _cells(10)
    cells["score"] = cells["score"][:5]
    with pytest.raises(ValueError, match="length"):
        write_cells_csv(tmp_path / "cells.csv", cells)
    del cells["score"]
    with pytest.raises(ValueError, match="lacks"):
        write_cells_csv(tmp_path / "cells.csv", cells)
    assert _leftovers(tmp_path) == []


# --- cells.geojson ---------------------------------------------------------------------

def test_cells_geojson_detections(tmp_path):
    cells = _cells(300, seed=1)
    cells["score"][5] = np.nan
    path = tmp_path / "cells.geojson"
    radius = {"lymphocyte": 12.0, "tumour": 20.0}
    write_cells_geojson(path, cells, radius_px=radius, colors=CLASS_COLORS)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 300
    ids = set()
    for i, f in enumerate(data["features"]):
        geom = shape(f["geometry"])
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert geom.is_valid
        ring = f["geometry"]["coordinates"][0]
        assert len(ring) == 13 and ring[0] == ring[-1]
        c = geom.centroid
        assert abs(c.x - cells["x_px"][i]) < 0.01 and abs(c.y - cells["y_px"][i]) < 0.01
        p = f["properties"]
        name = cells["class"][i]
        assert p["objectType"] == "detection" and p["isLocked"] is False
        assert p["classification"] == {"name": name, "color": list(CLASS_COLORS[name])}
        assert p["compartment"] == cells["compartment"][i]
        r = radius.get(name, 20.0)  # classes not listed take the largest radius
        assert geom.area == pytest.approx(3 * r * r, rel=1e-3)  # regular 12-gon
        if i == 5:
            assert p["measurements"] == {}
        else:
            assert p["measurements"]["score"] == pytest.approx(cells["score"][i], abs=5e-4)
        ids.add(str(uuid.UUID(f["id"])))
    assert len(ids) == 300
    first = path.read_bytes()
    write_cells_geojson(path, cells, radius_px=radius, colors=CLASS_COLORS)
    assert path.read_bytes() == first  # same input, same file (stable ids)


def test_cells_geojson_extra_measurements_and_properties(tmp_path):
    """IHC detections: more measurements (non-finite ones left out, commas right when the
    score itself is missing) and string properties, all valid JSON; text columns in the
    CSV (the IHC gate)."""
    cells = _cells(5)
    cells["score"][1] = np.nan
    area = np.array([30.0, np.nan, 12.5, 40.0, 8.25])
    dab = np.array([0.1, 0.2, np.inf, 0.4, 0.5])
    gate = np.array(["passed", "shape", "passed", "faint_nucleus", "marker_location"])
    path = tmp_path / "cells.geojson"
    write_cells_geojson(path, cells, radius_px=3.0, measurements={"Nucleus: Area µm^2": area,
                                                        "DAB: Nucleus: Mean": dab},
                        properties={"marker": np.full(5, "cd20"), "gate": gate})
    feats = json.loads(path.read_text(encoding="utf-8"))["features"]
    m = [f["properties"]["measurements"] for f in feats]
    assert m[0] == {"score": pytest.approx(cells["score"][0], abs=1e-3),
                    "Nucleus: Area µm^2": 30.0, "DAB: Nucleus: Mean": 0.1}
    assert m[1] == {"DAB: Nucleus: Mean": 0.2}  # no score, no area: no leading comma
    assert "DAB: Nucleus: Mean" not in m[2] and m[4]["Nucleus: Area µm^2"] == 8.25
    assert [f["properties"]["gate"] for f in feats] == gate.tolist()
    assert {f["properties"]["marker"] for f in feats} == {"cd20"}
    write_cells_csv(tmp_path / "cells.csv", {**cells, "gate": gate}, extra=("gate",))
    rows = (tmp_path / "cells.csv").read_text().splitlines()
    assert rows[0].endswith(",gate") and rows[4].endswith(",faint_nucleus")


def test_cells_geojson_empty(tmp_path):
    path = tmp_path / "cells.geojson"
    write_cells_geojson(path, {k: v[:0] for k, v in _cells(3).items()}, radius_px=10.0,
                        colors=CLASS_COLORS)
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}


# --- regions.geojson -------------------------------------------------------------------

def _hand_labels() -> np.ndarray:
    lab = np.zeros((30, 40), np.uint8)
    lab[2:12, 2:12] = 1  # tumour square 10×10 ...
    lab[5:9, 5:9] = 2  # ... with a 4×4 hole holding stroma
    lab[15:27, 20:24] = 2  # L-shaped stroma: 12×4 bar + 4×8 foot
    lab[23:27, 24:32] = 2
    return lab


def _signed_area(ring) -> float:
    x, y = np.asarray(ring, float).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def assert_rings_counter_clockwise(geometry: dict) -> None:
    """RFC 7946: exterior rings counter-clockwise, holes clockwise (the shoelace sign of
    the coordinates as written), for a GeoJSON Polygon or MultiPolygon."""
    polygons = ([geometry["coordinates"]] if geometry["type"] == "Polygon"
                else geometry["coordinates"])
    for rings in polygons:
        assert _signed_area(rings[0]) > 0
        assert all(_signed_area(hole) < 0 for hole in rings[1:])


def test_regions_geojson_exact_pixel_edges(tmp_path):
    lab, s, mpp = _hand_labels(), 4.0, 0.5
    path = tmp_path / "regions.geojson"
    write_regions_geojson(path, lab, scale_to_l0=s, class_names=REGIONS, colors=CLASS_COLORS,
                          mpp_l0=mpp, simplify_px=None)
    feats = {f["properties"]["classification"]["name"]: f
             for f in json.loads(path.read_text())["features"]}
    assert set(feats) == {"tumour", "stroma"}
    for name, f in feats.items():
        p = f["properties"]
        assert p["objectType"] == "annotation"
        assert p["classification"]["color"] == list(CLASS_COLORS[name])
        geom = shape(f["geometry"])
        assert geom.is_valid and f["geometry"]["type"] == "MultiPolygon"
        assert_rings_counter_clockwise(f["geometry"])
        count = int((lab == (1 if name == "tumour" else 2)).sum())
        assert geom.area == count * s * s  # pixel edges, exactly
        assert p["measurements"]["area_um2"] == pytest.approx(count * (s * mpp) ** 2)
        assert p["measurements"]["area_mm2"] == pytest.approx(count * (s * mpp) ** 2 * 1e-6)
    tumour = shape(feats["tumour"]["geometry"])
    assert len(tumour.geoms) == 1 and len(tumour.geoms[0].interiors) == 1
    hole = shapely.Polygon(tumour.geoms[0].interiors[0])
    assert hole.equals(shapely.box(5 * s, 5 * s, 9 * s, 9 * s))
    assert tumour.bounds == (2 * s, 2 * s, 12 * s, 12 * s)
    stroma = shape(feats["stroma"]["geometry"])
    assert len(stroma.geoms) == 2 and stroma.covers(hole)


def test_regions_geojson_traced_in_bands_and_clipped_to_the_image(tmp_path):
    """Bands of a few rows give the same polygons as one pass (pieces reaching a band edge
    are merged), one per 4-connected piece; the region map's last row and column reach
    past the image and are clipped to it."""
    import cv2
    from scipy import ndimage

    rng = np.random.default_rng(7)
    field = ndimage.gaussian_filter(rng.standard_normal((90, 70)), 3)
    lab = np.digitize(field, [-0.1, 0.0, 0.1]).astype(np.uint8)
    lab[rng.random(lab.shape) < 0.03] = 3  # specks, many touching only at a corner
    s, size = 8.0, (70 * 8.0 - 5, 90 * 8.0 - 3)  # the last column/row is 3/8 and 5/8 inside
    one, banded = tmp_path / "one.geojson", tmp_path / "banded.geojson"
    write_regions_geojson(one, lab, scale_to_l0=s, class_names=REGIONS, mpp_l0=0.5,
                          image_size_l0=size)
    write_regions_geojson(banded, lab, scale_to_l0=s, class_names=REGIONS, mpp_l0=0.5,
                          image_size_l0=size,
                          band_rows=7)
    feats = {f["properties"]["classification"]["name"]: f
             for f in json.loads(banded.read_text())["features"]}
    whole = {f["properties"]["classification"]["name"]: shape(f["geometry"])
             for f in json.loads(one.read_text())["features"]}
    image = shapely.box(0, 0, *size)
    for code, name in REGIONS.items():
        geom = shape(feats[name]["geometry"])
        assert geom.is_valid and image.covers(geom)
        assert_rings_counter_clockwise(feats[name]["geometry"])
        assert geom.symmetric_difference(whole[name]).area == 0
        n = cv2.connectedComponents((lab == code).astype(np.uint8), connectivity=4)[0] - 1
        assert len(geom.geoms) == n
        m = lab == code
        clipped = m.sum() - m[:, -1].sum() * 5 / 8 - m[-1, :].sum() * 3 / 8 + m[-1, -1] * 15 / 64
        assert geom.area == pytest.approx(clipped * s * s)
        area_mm2 = feats[name]["properties"]["measurements"]["area_mm2"]
        assert area_mm2 == pytest.approx(geom.area * 0.25e-6, abs=1e-6)


def test_polygons_exact_on_random_masks_with_corner_touches():
    rng = np.random.default_rng(3)
    checker = (np.indices((6, 7)).sum(axis=0) % 2).astype(bool)  # corner touches only
    masks = [checker, ~checker] + [rng.random((int(h), int(w))) < rng.uniform(0.2, 0.8)
                                   for h, w in rng.integers(1, 25, (60, 2))]
    for m in masks:
        g = mask_to_multipolygon(m)
        assert g.is_valid and g.area == m.sum()
        yy, xx = np.mgrid[0:m.shape[0], 0:m.shape[1]]
        inside = shapely.contains_xy(g, xx.ravel() + 0.5, yy.ravel() + 0.5)
        assert (inside.reshape(m.shape) == m).all()


def test_regions_geojson_simplified_is_valid(tmp_path):
    rng = np.random.default_rng(4)
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal((200, 240)), 4)
    lab = np.digitize(field, [-0.05, 0.0, 0.05]).astype(np.uint8)
    path = tmp_path / "regions.geojson"
    write_regions_geojson(path, lab, scale_to_l0=16.0, class_names=REGIONS, colors=CLASS_COLORS,
                          mpp_l0=0.25, simplify_px=0.5)
    for f in json.loads(path.read_text())["features"]:
        geom = shape(f["geometry"])
        code = {v: k for k, v in REGIONS.items()}[f["properties"]["classification"]["name"]]
        assert geom.is_valid
        assert geom.area == pytest.approx((lab == code).sum() * 256.0, rel=0.02)


# --- maps.zarr -------------------------------------------------------------------------

_DENSITY = np.zeros((2, 2), np.float32)  # a density map where a test needs none


def _ome(path):
    import zarr

    return zarr.open_group(str(path), mode="r")


def test_ome_zarr_metadata_and_levels(tmp_path):
    rng = np.random.default_rng(5)
    lab = np.kron(rng.integers(0, 4, (75, 65)), np.ones((8, 8))).astype(np.uint8)  # 600×520
    dmap = rng.uniform(0, 500, (40, 30)).astype(np.float32)
    dmap[:2, :4] = np.nan  # no tissue there
    path = tmp_path / "maps.zarr"
    write_ome_zarr(path, lab, mpp_labels=2.0, density_map=dmap, density_mpp=32.0,
                   class_names=REGIONS, colors=CLASS_COLORS)
    root = _ome(path)
    assert root.attrs["ome"]["version"] == "0.5"
    reg = root["labels/regions"]
    assert root["labels"].attrs["ome"] == {"version": "0.5", "labels": ["regions"]}
    ome = reg.attrs["ome"]
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["unit"] == "micrometer" and a["type"] == "space" for a in ms["axes"])
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2"]  # 600×520 → 300 → 150
    for k, d in enumerate(ms["datasets"]):
        scale, shift = d["coordinateTransformations"]
        assert scale == {"type": "scale", "scale": [2.0 * 2**k] * 2}
        assert shift["translation"] == [2.0 * 2**k / 2] * 2
    np.testing.assert_array_equal(reg["0"][:], lab)
    assert reg["1"].shape == (300, 260) and reg["2"].shape == (150, 130)
    np.testing.assert_array_equal(reg["1"][:], lab[::2, ::2])  # 8-px blocks: mode = any
    assert reg["0"].metadata.dimension_names == ("y", "x")
    label = ome["image-label"]
    colors = {c["label-value"]: c["rgba"] for c in label["colors"]}
    assert colors[1] == [*CLASS_COLORS["tumour"], 255] and colors[0][3] == 0
    props = {p["label-value"]: p["class"] for p in label["properties"]}
    assert props == {0: "background", **REGIONS} and set(props) == set(colors)
    assert label["source"] == {"image": "../../"}
    # the root image is the density map, with as many levels as the labels (NGFF rule)
    dms = root.attrs["ome"]["multiscales"][0]
    assert dms["name"] == "til_density" and len(dms["datasets"]) == 3
    assert dms["datasets"][1]["coordinateTransformations"][0]["scale"] == [64.0, 64.0]
    np.testing.assert_array_equal(root["0"][:], dmap)
    assert root["0"].dtype == np.float32 and root["2"].shape == (10, 8)
    assert np.isnan(root["1"][0, 0]) and root["1"][0, 3] == pytest.approx(dmap[:2, 6:8].mean())
    assert root.attrs["tilscore"]["density"]["grid_um"] == 32.0
    assert "tissue area" in root.attrs["tilscore"]["density"]["denominator"]


def assert_opens_in_ome_zarr_readers(path, density_name: str = "til_density") -> dict:
    """Strict ome-zarr-models validation of `path` (the 0.5 image, its labels group and
    label image), and the ome-zarr Reader (what napari's plugin uses) finds the image and
    the regions label with its parent, colours and class names. Returns the Reader's nodes
    by path under maps.zarr ("" = the image)."""
    import logging
    import warnings

    models = pytest.importorskip("ome_zarr_models")
    from ome_zarr_models.exceptions import ValidationWarning
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    with warnings.catch_warnings():
        warnings.simplefilter("error", ValidationWarning)
        image = models.open_ome_zarr(str(path), version="0.5")
        assert isinstance(image, Image) and image.labels.label_paths == ["regions"]
        label = models.open_ome_zarr(str(path / "labels" / "regions"), version="0.5")
        assert isinstance(label, ImageLabel)
    log = logging.getLogger("ome_zarr")
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        nodes = list(reader.Reader(parse_url(str(path)))())
    finally:
        log.removeHandler(handler)
    assert not [m for m in seen if "no parent found" in m], seen
    by_path = {n.zarr.path.rstrip("/").split("maps.zarr")[-1]: n for n in nodes}
    assert set(by_path) >= {"", "/labels/regions"}
    img, regions = by_path[""], by_path["/labels/regions"]
    assert img.metadata["name"] == density_name and img.data[0].dtype == np.float32
    assert any(type(s).__name__ == "Label" for s in regions.specs)
    assert regions.metadata["properties"][1] == {"class": "tumour"}
    assert regions.metadata["color"][1][:3] == [c / 255 for c in CLASS_COLORS["tumour"]]
    return by_path


def test_ome_zarr_opens_in_ome_zarr_readers(tmp_path):
    lab = np.zeros((700, 300), np.uint8)
    lab[100:400, 50:250] = 1
    lab[400:600, 50:250] = 3
    path = tmp_path / "maps.zarr"
    write_ome_zarr(path, lab, mpp_labels=2.0, density_map=np.full((14, 6), 50.0, np.float32),
                   density_mpp=100.0, class_names=REGIONS,
                   colors=CLASS_COLORS)
    nodes = assert_opens_in_ome_zarr_readers(path)
    assert nodes[""].data[0].shape == (14, 6)
    assert nodes["/labels/regions"].data[0].shape == (700, 300)


def test_ome_zarr_mode_and_mean_downsampling(tmp_path):
    from tilscore.io.ome_zarr import _mean2x2, _mode2x2

    a = np.array([[1, 1, 2, 3, 0], [2, 1, 3, 2, 0], [0, 0, 3, 3, 1]], np.uint8)
    np.testing.assert_array_equal(_mode2x2(a), [[1, 2, 0], [0, 3, 1]])
    d = np.array([[1.0, 3.0, np.nan], [np.nan, 2.0, np.nan]], np.float32)
    np.testing.assert_allclose(_mean2x2(d), [[2.0, np.nan]])


def test_ome_zarr_banded_zarr_source_equals_numpy(tmp_path):
    import zarr

    rng = np.random.default_rng(6)
    lab = rng.integers(0, 4, (5000, 300)).astype(np.uint8)
    src = zarr.open_group(str(tmp_path / "canvas.zarr"), mode="w").create_array(
        "labels", shape=lab.shape, chunks=(256, 256), dtype="uint8", fill_value=0)
    src[:] = lab
    write_ome_zarr(tmp_path / "a.zarr", lab, mpp_labels=1.0, density_map=_DENSITY,
                   density_mpp=100.0, class_names=REGIONS, band_rows=10_000)
    write_ome_zarr(tmp_path / "b.zarr", src, mpp_labels=1.0, density_map=_DENSITY,
                   density_mpp=100.0, class_names=REGIONS, band_rows=2048)
    a, b = (_ome(tmp_path / name)["labels/regions"] for name in ("a.zarr", "b.zarr"))
    assert sorted(a.array_keys()) == sorted(b.array_keys()) == ["0", "1"]
    assert b["1"].shape == (2500, 150)
    for k in ("0", "1"):
        np.testing.assert_array_equal(a[k][:], b[k][:])


# --- overlay.png -----------------------------------------------------------------------

def test_overlay_png(tmp_path):
    from PIL import Image

    thumb = np.full((1000, 3000, 3), 230, np.uint8)  # 8 µm/px: 24 × 8 mm
    lab = np.zeros((500, 1500), np.uint8)  # 16 µm/px
    lab[250:450, 1000:1400] = 1  # tumour: y 4000–7200 µm, x 16000–22400 µm
    lab[0:40, 0:40] = 1  # tumour in the top-left corner, where the legend box used to be
    cells = np.array([[6000.0, 6000.0], [30000.0, 1.0]])  # second one off the image
    path = tmp_path / "overlay.png"
    legend = {n: CLASS_COLORS[n] for n in ("tumour", "stroma", "other", "lymphocyte")}
    write_overlay_png(path, thumb, thumb_mpp=8.0, labels=lab, labels_mpp=16.0, cells_xy_um=cells,
                      legend=legend, title="sTIL 23.4 %")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[1] == 2048 and img.shape[0] > 683  # long side capped; legend below
    out_mpp = 8.0 * 3000 / 2048
    tinted = np.rint(0.65 * 230 + 0.35 * np.array(CLASS_COLORS["tumour"]))
    r, c = int(5600 / out_mpp), int(19200 / out_mpp)  # tumour centre
    np.testing.assert_allclose(img[r, c], tinted, atol=1)
    assert (img[600, 100] == 230).all()  # background untouched
    r, c = int(6000 / out_mpp), int(6000 / out_mpp)
    assert (img[r - 1:r + 2, c - 1:c + 2] == CLASS_COLORS["lymphocyte"]).all(axis=2).any()
    # no legend on the image: the tumour in the top-left corner is as tinted as elsewhere
    corner = img[:int(640 / out_mpp) - 1, :int(640 / out_mpp) - 1].reshape(-1, 3)
    assert np.abs(corner - tinted).max() <= 1
    strip = img[683:]  # the legend, below the image: white with dark text and swatches
    assert (strip == 255).all(axis=2).mean() > 0.5 and (strip < 80).all(axis=2).any()
    assert (strip == CLASS_COLORS["tumour"]).all(axis=2).any()
    assert not (strip == CLASS_COLORS["stroma"]).all(axis=2).any()  # no stroma on the map


def test_overlay_dots_stay_visible_in_the_report_thumbnail(tmp_path):
    """Positive cells drawn on brown-stained IHC tissue are still visible once the overlay
    is shrunk to the report's 640 px JPEG (they were 2 px dots in the cells' own brown)."""
    import base64
    import io

    from PIL import Image

    from tilscore.report.cohort import OVERLAY_LONG_SIDE_PX
    from tilscore.report.plots import image_data_uri

    rng = np.random.default_rng(2)
    thumb = np.clip(rng.normal((170, 120, 90), 25, (1536, 1536, 3)), 0, 255).astype(np.uint8)
    cells = rng.uniform(500, 5500, (60, 2))  # µm, on a 4 µm/px thumbnail
    legend = {"cd20_positive": CLASS_COLORS["cd20_positive"]}
    shown = []
    for name, xy in (("plain", np.zeros((0, 2))), ("dots", cells)):
        write_overlay_png(tmp_path / f"{name}.png", thumb, thumb_mpp=4.0,
                          labels=np.zeros((10, 10), np.uint8), labels_mpp=1000.0,
                          cells_xy_um=xy, legend=legend, title="CD20+", class_names={})
        full = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
        uri = image_data_uri(full, OVERLAY_LONG_SIDE_PX, fmt="JPEG")
        shown.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",")[1])))
                                .convert("RGB")).astype(int))
    scale = shown[0].shape[1] / 1536
    diff = np.abs(shown[1] - shown[0]).sum(axis=2)
    for x, y in cells / 4.0 * scale:
        r, c = int(y), int(x)
        assert diff[r - 1:r + 2, c - 1:c + 2].max() > 150, (x, y)  # a clear mark


# --- atomicity -------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_do_not_get_in_the_way(tmp_path):
    import socket

    host = socket.gethostname().replace("-", "_")
    (tmp_path / ".cells.csv.abc123.tmp").write_text("half a file")
    stale = tmp_path / f".maps.zarr.tmp-{host}-{_dead_pid()}"
    stale.mkdir()
    (stale / "junk").write_text("x")
    write_cells_csv(tmp_path / "cells.csv", _cells(20))
    write_ome_zarr(tmp_path / "maps.zarr", np.ones((10, 10), np.uint8), mpp_labels=1.0,
                   density_map=_DENSITY, density_mpp=100.0,
                   class_names=REGIONS)
    assert len(list(csv.reader(open(tmp_path / "cells.csv")))) == 21
    assert _leftovers(tmp_path) == [".cells.csv.abc123.tmp", "cells.csv", "maps.zarr"]


class _FailingSource:
    """A label source whose second band read fails (e.g. an I/O error mid-way)."""

    shape, dtype = (100, 20), np.dtype(np.uint8)

    def __init__(self):
        self.reads = 0

    def __getitem__(self, item):
        self.reads += 1
        if self.reads > 1:
            raise OSError("disk went away")
        return np.ones((10, 20), np.uint8)


def test_failed_writes_leave_nothing_behind(tmp_path):
    cells = _cells(50)
    cells["score"] = cells["score"].astype(object)
    cells["score"][35] = "not a number"  # fails in the 4th chunk
    with pytest.raises(ValueError):
        write_cells_csv(tmp_path / "cells.csv", cells, chunk_rows=10)
    with pytest.raises(OSError):
        write_ome_zarr(tmp_path / "maps.zarr", _FailingSource(), mpp_labels=1.0,
                       density_map=_DENSITY, density_mpp=100.0,
                       class_names=REGIONS, band_rows=10)
    with pytest.raises(ValueError):
        write_ome_zarr(tmp_path / "maps.zarr", np.zeros((4, 4, 3), np.uint8), mpp_labels=1.0,
                       density_map=_DENSITY,
                       density_mpp=100.0, class_names=REGIONS)
    with pytest.raises(ValueError, match="density map"):
        write_ome_zarr(tmp_path / "maps.zarr", np.zeros((4, 4), np.uint8), mpp_labels=1.0,
                       density_map=None, density_mpp=None,
                       class_names=REGIONS)
    with pytest.raises(ValueError):
        write_overlay_png(tmp_path / "overlay.png", np.zeros((10, 10, 3), np.float32),
                          thumb_mpp=8.0, labels=np.zeros((5, 5), np.uint8), labels_mpp=16.0,
                          cells_xy_um=np.zeros((0, 2)), legend={}, title="t")
    with pytest.raises(ValueError):
        write_regions_geojson(tmp_path / "regions.geojson", np.zeros((2, 2, 2), np.uint8),
                              scale_to_l0=1.0, class_names=REGIONS, mpp_l0=1.0)
    assert _leftovers(tmp_path) == []


def test_failed_rewrite_keeps_previous_output(tmp_path):
    path = tmp_path / "maps.zarr"
    write_ome_zarr(path, np.full((10, 10), 2, np.uint8), mpp_labels=1.0, density_map=_DENSITY,
                   density_mpp=100.0, class_names=REGIONS)
    with pytest.raises(OSError):
        write_ome_zarr(path, _FailingSource(), mpp_labels=1.0, density_map=_DENSITY,
                       density_mpp=100.0, class_names=REGIONS, band_rows=10)
    assert _leftovers(tmp_path) == ["maps.zarr"]
    assert (_ome(path)["labels/regions/0"][:] == 2).all()
    write_ome_zarr(path, np.full((10, 10), 3, np.uint8), mpp_labels=1.0, density_map=_DENSITY,
                   density_mpp=100.0, class_names=REGIONS)
    assert (_ome(path)["labels/regions/0"][:] == 3).all()  # replaced
    assert _leftovers(tmp_path) == ["maps.zarr"]


def test_atomic_dir_replaces_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
        assert not os.path.isdir(target)
    assert (target / "a").read_text() == "new"
    assert _leftovers(tmp_path) == ["out"]
