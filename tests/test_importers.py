"""Labelled-tile importers: each format written by the test itself, plus the real he-crchp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tilscore.errors import InputError, MissingMppError, UsageError
from tilscore.training.importers import (
    IGNORE,
    UNCLASSIFIED,
    LabelledTile,
    LoadStats,
    detect_format,
    load_bcss,
    load_crchp,
    load_folder,
    load_native,
    load_nucls,
    load_qupath,
    load_tiger,
    weak_regions,
    write_native,
)
from tilscore.training.importers.bcss import BCSS_LUT

LYM, OTH, TUMC, STRC = 0, 1, 2, 3  # CELL_CODES: lymphocyte, other, tumour, stromal
BG, TUM, STR, OTHER_REGION = 0, 1, 2, 3
PINK = (200, 120, 180)


def rgb(h: int = 64, w: int = 80, colour=PINK) -> np.ndarray:
    image = np.empty((h, w, 3), np.uint8)
    image[:] = colour
    return image


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# -- native --------------------------------------------------------------------------------
def test_native_round_trip(tmp_path):
    region = np.full((64, 80), IGNORE, np.uint8)
    region[:10], region[10:20], region[20:30] = TUM, STR, BG
    nucleus = np.zeros((64, 80), np.uint8)
    nucleus[5:9, 5:9] = 1
    tiles = [
        LabelledTile(rgb(), 0.5, region, np.array([[10.5, 20.0], [0.5, 63.5], [3.0, 4.0]]),
                     np.array([LYM, OTH, UNCLASSIFIED]), nucleus_mask=nucleus,
                     source="/x/a b.png", split="train"),
        LabelledTile(rgb(32, 32), 0.25, None, np.zeros((0, 2)), np.zeros(0, np.int64),
                     has_cells=False, source="/y/a b.png"),
    ]
    ids = write_native(tmp_path / "ds", tiles, name="test", licence="CC0")
    assert ids == ["a_b", "a_b_1"]
    assert detect_format(tmp_path / "ds") == "native"
    back = load_folder(tmp_path / "ds")
    assert [t.mpp for t in back] == [0.5, 0.25]
    np.testing.assert_array_equal(back[0].image, tiles[0].image)
    np.testing.assert_array_equal(back[0].region, region)
    np.testing.assert_array_equal(back[0].nucleus_mask, nucleus)
    np.testing.assert_allclose(back[0].points_xy, tiles[0].points_xy)
    assert back[0].point_cls.tolist() == [LYM, OTH, UNCLASSIFIED]
    assert back[0].split == "train" and back[0].has_cells
    assert back[1].region is None and not back[1].has_cells and len(back[1].points_xy) == 0
    with pytest.raises(UsageError, match="already holds"):
        write_native(tmp_path / "ds", tiles)


def test_native_hand_written(tmp_path):
    save_png(tmp_path / "images" / "t1.png", rgb())
    save_png(tmp_path / "images" / "t2.jpg", rgb())
    save_json(tmp_path / "dataset.json", {"mpp": 0.5, "name": "x", "licence": "y"})
    save_json(tmp_path / "cells" / "t1.json", {"mpp": 0.25, "points": [
        {"x": 1.5, "y": 2.5, "class": "lymphocyte"}, {"x": 3, "y": 4, "class": "tumour"},
        {"x": 5, "y": 6, "class": "Fibroblast"}, {"x": 7, "y": 8, "class": "unclassified"}]})
    tiles = load_native(tmp_path)
    assert [t.mpp for t in tiles] == [0.25, 0.5]
    assert tiles[0].point_cls.tolist() == [LYM, TUMC, OTH, UNCLASSIFIED]
    assert tiles[1].region is None and not tiles[1].has_cells
    assert [t.mpp for t in load_native(tmp_path, mpp=0.3)] == [0.3, 0.3]


def test_native_bad_input(tmp_path):
    save_png(tmp_path / "images" / "t1.png", rgb())
    save_png(tmp_path / "regions" / "t1.png", np.full((64, 80), 7, np.uint8))
    with pytest.raises(MissingMppError, match="--mpp"):
        load_native(tmp_path)
    with pytest.raises(InputError, match=r"t1\.png: region codes \[7\]"):
        load_native(tmp_path, mpp=0.5)
    save_png(tmp_path / "regions" / "t1.png", np.zeros((10, 80), np.uint8))
    with pytest.raises(InputError, match=r"t1\.png: mask is 80x10 px but its image is 80x64"):
        load_native(tmp_path, mpp=0.5)
    (tmp_path / "regions" / "t1.png").unlink()
    save_json(tmp_path / "cells" / "t1.json", {"points": [{"x": 1, "y": 2}]})
    with pytest.raises(InputError, match=r"t1\.json: point 0"):
        load_native(tmp_path, mpp=0.5)
    (tmp_path / "cells" / "t1.json").write_text("{not json")
    with pytest.raises(InputError, match=r"t1\.json: invalid JSON"):
        load_native(tmp_path, mpp=0.5)
    with pytest.raises(UsageError, match="implausible"):
        load_native(tmp_path, mpp=-1)


# -- crchp ---------------------------------------------------------------------------------
def write_crchp(root: Path, name="img1", split="validation", points=None) -> Path:
    save_png(root / "images" / f"{name}.png", rgb(100, 100))
    points = points or {
        "inflammatory": [[10, 20]], "epithelial": [[30.25, 40]], "fibroblast": [[50, 60]],
        "others": [[70, 80]],
        "all_nuclei": [[10, 20], [30.25, 40], [50.4, 60.3], [70, 80], [90, 5], [50, 62]],
    }
    return save_json(root / "points" / f"{name}.json",
                     {"mpp": 0.55, "split_of_original_authors": split, "points": points})


def test_crchp_points_classes_and_split(tmp_path):
    write_crchp(tmp_path)
    assert detect_format(tmp_path) == "crchp"
    (tile,) = load_folder(tmp_path)
    assert tile.mpp == 0.55 and tile.split == "val" and tile.has_cells
    # class lists first (inflammatory, epithelial, fibroblast, others), then nuclei of
    # all_nuclei farther than 1 px from every class point; +0.5: index → pixel centre
    np.testing.assert_allclose(tile.points_xy, [[10.5, 20.5], [30.75, 40.5], [50.5, 60.5],
                                                [70.5, 80.5], [90.5, 5.5], [50.5, 62.5]])
    assert tile.point_cls.tolist() == [LYM, TUMC, STRC, OTH, UNCLASSIFIED, UNCLASSIFIED]
    assert tile.region.shape == (100, 100) and tile.region.dtype == np.uint8
    assert load_crchp(tmp_path, mpp=0.5)[0].mpp == 0.5


def write_consep(root: Path, name="consep_train_5") -> Path:
    """A 256 x 256 CoNSeP-shaped tile: three nuclei (inflammatory, epithelial, spindle) in
    a 16-bit instance map, points at their centroids (index coordinates)."""
    from PIL import Image

    save_png(root / "images" / f"{name}.png", rgb(256, 256))
    instances = np.zeros((256, 256), np.uint16)
    instances[10:15, 10:15] = 3  # centroid (x, y) = (12, 12): inflammatory
    instances[200:205, 20:25] = 7  # (22, 202): epithelial
    instances[30:33, 230:240] = 9  # (234.5, 31): spindle
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(instances).save(root / "masks" / f"{name}.png")
    points = {"inflammatory": [[12, 12]], "epithelial": [[22, 202]], "spindle": [[234.5, 31]],
              "other": [], "all_nuclei": [[12, 12], [22, 202], [234.5, 31]]}
    return save_json(root / "points" / f"{name}.json",
                     {"mpp": 0.2441, "split_of_original_authors": "train", "points": points})


def test_consep_classes_nucleus_mask_and_held_out_split(tmp_path):
    from tilscore.training.importers.consep import consep_split

    write_consep(tmp_path)
    write_consep(tmp_path, "consep_train_7")
    assert detect_format(tmp_path) == "consep"
    tiles = {Path(t.source).stem: t for t in load_folder(tmp_path)}
    tile = tiles["consep_train_5"]
    assert tile.mpp == 0.2441 and tile.split == "val" and tiles["consep_train_7"].split == "train"
    assert tile.point_cls.tolist() == [LYM, TUMC, STRC]
    np.testing.assert_allclose(tile.points_xy, [[12.5, 12.5], [22.5, 202.5], [235.0, 31.5]])
    # the lymphocyte-nucleus target is exactly the inflammatory instance's outline
    expected = np.zeros((256, 256), np.uint8)
    expected[10:15, 10:15] = 1
    np.testing.assert_array_equal(tile.nucleus_mask, expected)
    assert tile.region[202, 22] == TUM and tile.region[31, 234] == STR
    assert [consep_split(f"consep_train_{k}") for k in (1, 5, 10, 26, 25)] == [
        "train", "val", "val", "train", "val"]
    (tmp_path / "masks" / "consep_train_7.png").unlink()
    with pytest.raises(InputError, match="no instance mask"):
        load_folder(tmp_path)


def test_card_cell_index_maps_label_classes_onto_any_card():
    from tilscore.training.importers.labelled import card_cell_index

    codes = np.array([LYM, OTH, TUMC, STRC, UNCLASSIFIED])
    assert card_cell_index(codes, ("lymphocyte", "tumour", "stromal", "other")).tolist() == [
        0, 3, 1, 2, -1]
    assert card_cell_index(codes, ("lymphocyte", "other")).tolist() == [0, 1, 1, 1, -1]
    assert card_cell_index(codes, ()).tolist() == [-1] * 5


def test_weak_region_rule():
    mpp = 0.55  # disc 12 µm = 21.8 px, far 25 µm = 45.5 px
    image = rgb(200, 200)
    image[:60, 140:] = (240, 240, 238)  # glass, far from every nucleus
    image[40:45, 60:70] = (240, 240, 238)  # glass, but 20-30 px from the epithelial nucleus
    tumour, stroma = np.array([[40.5, 40.5]]), np.array([[160.5, 160.5], [120.5, 160.5]])
    region = weak_regions(image, tumour, stroma_xy=stroma, all_xy=np.concatenate([tumour, stroma]),
                          mpp=mpp)
    assert region[40, 40] == TUM and region[40, 60] == TUM  # 20 px away: inside the disc
    assert region[40, 63] == IGNORE  # 22.5 px: outside the disc, bright but near a nucleus
    assert region[160, 160] == STR and region[160, 180] == STR
    assert region[100, 100] == IGNORE  # tissue far from nuclei: unknown
    assert region[30, 170] == BG and region[0, 199] == BG
    assert (region[:60, 140:][region[:60, 140:] != BG] == IGNORE).all()
    # a tumour and a stroma nucleus 20 px apart: their shared pixels are ignored
    both = weak_regions(rgb(60, 60), np.array([[20.5, 30.5]]), stroma_xy=np.array([[40.5, 30.5]]),
                        all_xy=np.array([[20.5, 30.5], [40.5, 30.5]]), mpp=mpp)
    assert both[30, 30] == IGNORE and both[30, 5] == TUM and both[30, 55] == STR
    assert set(np.unique(region).tolist()) <= {BG, TUM, STR, IGNORE}


def test_crchp_bad_input(tmp_path):
    path = write_crchp(tmp_path)
    path.write_text("{")
    with pytest.raises(InputError, match=r"img1\.json: invalid JSON"):
        load_crchp(tmp_path)
    save_json(path, {"points": {"inflammatory": [[1, 2, 3]]}})
    with pytest.raises(InputError, match=r"img1\.json: points.inflammatory"):
        load_crchp(tmp_path)
    path.unlink()
    with pytest.raises(InputError, match=r"img1\.png: no labels"):
        load_crchp(tmp_path)


def test_points_outside_dropped_and_corrupt_images_skipped(tmp_path):
    write_crchp(tmp_path, points={"inflammatory": [[10, 10], [100, 50], [150, 50], [-5, 3]],
                                  "all_nuclei": []})
    write_crchp(tmp_path, name="img2")
    (tmp_path / "images" / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    stats = LoadStats()
    (tile,) = load_folder(tmp_path, stats=stats)
    assert stats.dropped_points == 2 and stats.clamped_points == 1
    assert tile.points_xy[:, 0].max() < 100
    assert len(stats.skipped_images) == 1 and stats.skipped_images[0][0].endswith("img2.png")
    assert stats.tiles == 1


# -- tiger ---------------------------------------------------------------------------------
TIGER_NAMES = ("roi_[0, 0, 80, 64].png", "roi_[80, 0, 160, 64].png")


def write_tiger(root: Path, coco: bool = True, names=TIGER_NAMES) -> None:
    mask = np.zeros((64, 80), np.uint8)
    for code in range(8):
        mask[code * 8 : code * 8 + 8] = code
    for name in names:
        save_png(root / "images" / name, rgb())
        save_png(root / "masks" / name, mask)
    if coco:
        save_json(root / "tiger-coco.json", {
            "images": [{"id": 7, "file_name": f"images/{names[0]}", "width": 80, "height": 64}],
            "annotations": [{"image_id": 7, "bbox": [10, 20, 12, 12], "category_id": 1},
                            {"image_id": 7, "bbox": [40.5, 8, 8, 6], "category_id": 2}],
            "categories": [{"id": 1, "name": "lymphocytes"}, {"id": 2, "name": "plasma cells"}],
        })


def test_tiger(tmp_path):
    write_tiger(tmp_path)
    assert detect_format(tmp_path) == "tiger"
    first, second = load_folder(tmp_path)
    expected = [IGNORE, TUM, STR, TUM, OTHER_REGION, OTHER_REGION, STR, OTHER_REGION]
    assert first.region[::8, 0].tolist() == expected
    assert first.mpp == 0.5 and first.has_cells
    np.testing.assert_allclose(first.points_xy, [[16.0, 26.0], [44.5, 11.0]])
    assert first.point_cls.tolist() == [LYM, LYM]
    assert not second.has_cells and len(second.points_xy) == 0  # not in tiger-coco.json
    assert load_tiger(tmp_path, mpp=0.48)[0].mpp == 0.48
    (tmp_path / "tiger-coco.json").unlink()
    assert detect_format(tmp_path) == "tiger"  # bracketed ROI names


def test_tiger_bad_input(tmp_path):
    write_tiger(tmp_path)
    save_json(tmp_path / "tiger-coco.json", {"images": [{"id": 1}]})
    with pytest.raises(InputError, match=r"tiger-coco\.json: not a COCO file"):
        load_tiger(tmp_path)
    save_png(tmp_path / "masks" / "roi_[0, 0, 80, 64].png", np.zeros((5, 5), np.uint8))
    (tmp_path / "tiger-coco.json").unlink()
    with pytest.raises(InputError, match=r"masks/roi_\[0, 0, 80, 64\]\.png: mask is 5x5"):
        load_tiger(tmp_path)


# -- bcss ----------------------------------------------------------------------------------
def test_bcss(tmp_path):
    mask = np.repeat(np.arange(22, dtype=np.uint8), 3)[:, None].repeat(10, axis=1)
    save_png(tmp_path / "images" / "TCGA-A1_xmin1_ymin2_MPP-0.2500.png", rgb(66, 10))
    save_png(tmp_path / "masks" / "TCGA-A1_xmin1_ymin2_MPP-0.2500.png", mask)
    save_png(tmp_path / "images" / "plain.png", rgb(66, 10))
    save_png(tmp_path / "masks" / "plain.png", np.full((66, 10), 23, np.uint8))
    assert detect_format(tmp_path) == "bcss"
    plain, named = load_folder(tmp_path)  # natural order: "plain" < "TCGA" ignoring case
    tumour, stroma, ignore = {1, 19, 20}, {2, 3, 10, 11}, {0, 7, 15}
    want = [TUM if c in tumour else STR if c in stroma else IGNORE if c in ignore
            else OTHER_REGION for c in range(22)]
    assert named.region[::3, 0].tolist() == want
    assert [BCSS_LUT[c] for c in range(22)] == want
    assert (plain.region == IGNORE).all()  # code 23 is not BCSS
    assert named.mpp == 0.25 and not named.has_cells and named.points_xy.shape == (0, 2)
    assert [t.mpp for t in load_bcss(tmp_path, mpp=0.5)] == [0.5, 0.5]
    colour = np.zeros((66, 10, 3), np.uint8) + np.uint8([1, 2, 3])
    save_png(tmp_path / "masks" / "plain.png", colour)
    with pytest.raises(InputError, match=r"plain\.png: colour mask"):
        load_bcss(tmp_path)
    (tmp_path / "masks" / "plain.png").unlink()
    with pytest.raises(InputError, match=r"plain\.png: no region mask"):
        load_bcss(tmp_path)


# -- nucls ---------------------------------------------------------------------------------
NUCLS_CSV = """\
,raw_classification,main_classification,super_classification,type,xmin,ymin,xmax,ymax,\
coords_x,coords_y
0,tumor,tumor_nonMitotic,tumor_any,rectangle,10,20,20,30,"10,20,20,10","20,20,30,30"
1,lymphocyte,lymphocyte,sTIL,rectangle,40,0,50,9,"",""
2,plasma_cell,plasma_cell,sTIL,rectangle,60,50,70,60,"",""
3,fibroblast,nonTILnonMQ_stromal,nonTIL_stromal,rectangle,0,40,6,50,"",""
4,unlabeled,AMBIGUOUS,AMBIGUOUS,rectangle,30,30,34,34,"",""
5,weird,alien_cell,other,rectangle,1,1,3,3,"",""
"""


def test_nucls(tmp_path):
    save_png(tmp_path / "rgb" / "fov1.png", rgb())
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "fov1.csv").write_text(NUCLS_CSV)
    assert detect_format(tmp_path) == "nucls"
    stats = LoadStats()
    (tile,) = load_folder(tmp_path, stats=stats)
    np.testing.assert_allclose(tile.points_xy, [[15, 25], [45, 4.5], [65, 55], [3, 45],
                                                [32, 32], [2, 2]])
    assert tile.point_cls.tolist() == [OTH, LYM, LYM, OTH, UNCLASSIFIED, UNCLASSIFIED]
    assert stats.unknown_classes == {"alien_cell": 1}
    assert tile.region is None and tile.has_cells and tile.mpp == 0.2
    (tmp_path / "csv" / "fov1.csv").write_text("xmin,ymin,xmax\n1,2,3\n")
    with pytest.raises(InputError, match=r"fov1\.csv: missing CSV columns ymax"):
        load_nucls(tmp_path)


# -- qupath --------------------------------------------------------------------------------
def feature(kind, geometry, name=None, **extra):
    props = {"objectType": kind}
    if name:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props, **extra}


def box(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write_qupath(root: Path, mpp=0.5) -> None:
    save_png(root / "images" / "slide1.png", rgb(40, 60))
    if mpp:
        save_json(root / "dataset.json", {"mpp": mpp})
    save_json(root / "annotations" / "slide1.geojson", {"type": "FeatureCollection", "features": [
        feature("annotation", {"type": "Polygon", "coordinates": [box(0, 0, 60, 40)]}, "Region*"),
        feature("annotation", {"type": "Polygon",  # tumour with a stroma-free hole
                               "coordinates": [box(10, 10, 30, 30), box(15, 15, 20, 20)]}, "Tumor"),
        feature("annotation", {"type": "MultiPolygon", "coordinates": [[box(40, 0, 50, 10)]]},
                "Stroma"),
        feature("annotation", {"type": "Polygon", "coordinates": [box(50, 30, 60, 40)]}, "Pen"),
        feature("detection", {"type": "Point", "coordinates": [12.5, 3.5]}, "Lymphocyte"),
        feature("cell", {"type": "Polygon", "coordinates": [box(30, 30, 40, 40)]},
                "Tumor: Positive",
                nucleusGeometry={"type": "Polygon", "coordinates": [box(32, 32, 36, 36)]}),
        feature("detection", {"type": "Polygon", "coordinates": [box(0, 30, 4, 34)]}),
        feature("annotation", {"type": "MultiPoint", "coordinates": [[1, 1], [2, 2]]},
                "Immune cells"),
    ]})


def test_qupath(tmp_path):
    write_qupath(tmp_path)
    assert detect_format(tmp_path) == "qupath"
    (tile,) = load_folder(tmp_path)
    region = tile.region
    assert tile.mpp == 0.5 and tile.has_cells
    assert region[0, 0] == OTHER_REGION  # Region* around everything
    assert region[10, 10] == TUM and region[29, 29] == TUM and region[30, 30] == OTHER_REGION
    assert region[17, 17] == OTHER_REGION  # hole: the annotation beneath shows through
    assert region[5, 45] == STR and region[35, 55] == IGNORE  # unknown class "Pen"
    assert (region == TUM).sum() == 20 * 20 - 5 * 5
    np.testing.assert_allclose(tile.points_xy, [[12.5, 3.5], [34, 34], [2, 32], [1, 1], [2, 2]])
    assert tile.point_cls.tolist() == [LYM, OTH, UNCLASSIFIED, LYM, LYM]
    assert load_qupath(tmp_path, mpp=0.25)[0].mpp == 0.25


def test_qupath_bad_input(tmp_path):
    write_qupath(tmp_path, mpp=None)
    with pytest.raises(MissingMppError, match="--mpp"):
        load_qupath(tmp_path)
    save_json(tmp_path / "annotations" / "slide1.geojson", {"type": "nonsense"})
    with pytest.raises(InputError, match=r"slide1\.geojson: not GeoJSON features"):
        load_qupath(tmp_path, mpp=0.5)


# -- detection and load_folder -------------------------------------------------------------
def test_detect_errors(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(UsageError, match="native, crchp, consep, tiger, bcss, nucls, qupath"):
        detect_format(tmp_path)
    with pytest.raises(InputError, match="no such folder"):
        load_folder(tmp_path / "missing")
    with pytest.raises(UsageError, match="unknown dataset format 'xyz'"):
        load_folder(tmp_path, fmt="xyz")
    (tmp_path / "images").mkdir()
    save_json(tmp_path / "dataset.json", {"format": "tilscore-native", "mpp": 0.5})
    assert detect_format(tmp_path) == "native"
    with pytest.raises(InputError, match=f"no labelled tiles in {tmp_path}"):
        load_folder(tmp_path)
    save_json(tmp_path / "dataset.json", {"format": "nope"})
    with pytest.raises(UsageError, match="unknown format 'nope'"):
        detect_format(tmp_path)


def test_declared_format_wins(tmp_path):
    write_tiger(tmp_path, coco=False, names=("a.png", "b.png"))  # plain names read as BCSS
    assert detect_format(tmp_path) == "bcss"
    save_json(tmp_path / "dataset.json", {"format": "tiger"})
    assert detect_format(tmp_path) == "tiger"
    assert load_folder(tmp_path)[0].region[8, 0] == TUM


# -- real data -----------------------------------------------------------------------------
@pytest.mark.real_data
def test_real_crchp():
    folder = shared_path("he-crchp")
    assert detect_format(folder) == "crchp"
    stats = LoadStats()
    tiles = load_folder(folder, stats=stats)
    assert len(tiles) == 80 and not stats.skipped_images
    assert {t.mpp for t in tiles} == {0.55} and {t.split for t in tiles} == {"train", "val"}
    img1 = next(t for t in tiles if Path(t.source).stem == "img1")
    raw = json.loads((folder / "points" / "img1.json").read_text())["points"]
    assert (img1.point_cls == LYM).sum() == len(raw["inflammatory"])
    assert img1.image.shape == (500, 500, 3) and img1.image.dtype == np.uint8
    cls = np.concatenate([t.point_cls for t in tiles])
    assert (cls == LYM).sum() == 4905  # all inflammatory points of the 80 images kept
    assert (cls == TUMC).sum() > 5000 and (cls == STRC).sum() > 4000
    assert 5000 < (cls == UNCLASSIFIED).sum() < 6500
    regions = np.stack([t.region for t in tiles])
    for code in (TUM, STR, IGNORE):
        assert 0.1 < (regions == code).mean() < 0.7


@pytest.mark.real_data
def test_real_consep():
    folder = shared_path("he-consep")
    assert detect_format(folder) == "consep"
    tiles = load_folder(folder)
    assert len(tiles) == 27 and sum(t.split == "val" for t in tiles) == 5
    cls = np.concatenate([t.point_cls for t in tiles])
    # the README's counts: 3,941 inflammatory, 5,537 epithelial, 5,706 spindle, 371 other
    assert [(cls == c).sum() for c in (LYM, TUMC, STRC, OTH)] == [3941, 5537, 5706, 371]
    # every inflammatory instance, and nothing else, is in the nucleus target
    from tilscore.training.importers.native import read_mask

    tile = tiles[0]
    instances = read_mask(folder / "masks" / f"{Path(tile.source).stem}.png",
                          tile.image.shape[:2])
    inside = np.unique(instances[tile.nucleus_mask > 0])
    assert len(inside) == (tile.point_cls == LYM).sum() and 0 not in inside
    area_um2 = sum(int(t.nucleus_mask.sum()) for t in tiles) * 0.2441 ** 2 / 3941
    assert 6 < area_um2 < 40  # CoNSeP's tight outlines: ~11 µm² per lymphocyte nucleus
