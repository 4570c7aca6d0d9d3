"""Validate the classical IHC detector (tilscore.scoring.ihc_detect) against labelled data.

Prints markdown tables: per dataset TP, FP, FN, precision, recall, F1 and positive calls
per true (annotated) positive cell, for tilscore and for a naive baseline (Ruifrok
deconvolution, DAB threshold, connected components; its threshold picked on the data
itself, which flatters it); per synthetic marker the same plus the count ratio
(positive calls / true positives); the positives found on synthetic H&E; the specificity
on real IHC with no stained lymphocytes; and the lymphocyte gate on typed H&E nuclei.

    .venv/bin/python scripts/validate_ihc.py [--data ../shared/data] [--device cpu]
        [--sweep] [--per-image] [--overlays DIR] [--edge-crops]

Datasets (under ``--data``; see its README):
- ihc-ki67-deepliif: Ki67 (nuclear, "foxp3" rules), 0.25 µm/px; truth positives are the
  connected components of the dominant-red mask. Ki67 marks every proliferating cell
  (mostly tumour cells), so its sensitivity figure runs the nuclear rule *without* the
  lymphocyte gate; a second row says how many of its calls the gate keeps. The masks
  leave many clearly brown nuclei unlabelled (neither red nor blue), so besides the
  strict score a "judged" score ignores unmatched calls farther than JUDGED_RADIUS_UM
  from any labelled pixel.
- ihc-cd3cd8-nuclick: CD3/CD8 (membranous lymphocyte markers, "cd20" rules *with* the
  gate), 0.12 µm/px; truth cells are the components of the mask thresholded at 128. Not
  every DAB+ cell is annotated, so precision is a lower bound; the bar is recall and
  calls per annotated cell.
- synthetic: tilscore.synth.scene tiles at 0.5 µm/px (the pipeline's mpp) with exact
  truth; positives centred just outside a tile are ignore points (neither right nor wrong).
- specificity: ``skimage.data.immunohistochemistry()`` (colon, DAB on epithelial
  membranes and cytoplasm, no stained lymphocytes; ~0.5 µm/px) scored end to end by
  ``tilscore score --model none`` as CD20 and as FOXP3: percent positive, and the rate
  within 10 px of the image edge against the interior's.
- edge effect (``--edge-crops``): sliding crops of the real images above, the positive
  rate within 5 µm of a crop's edge against further in, with exact and bootstrap
  intervals, and the whole image's positives centred near a crop's edge kept or not.
- he-consep (the gate alone): CoNSeP's typed nuclei (H&E, haematoxylin only), the share
  of inflammatory, epithelial and spindle nuclei the lymphocyte gate lets through.

Each real image plays its own slide: its stain vectors and glass colour come from
:func:`tilscore.scoring.ihc.estimate_stain_vectors` on the image (``--no-calibrate``: Ruifrok
defaults, glass 255). ``--overlays DIR`` writes each real image with its calls drawn
(red: positive; blue: negative; grey, orange, purple, green: rejected as a faint nucleus,
by size, by shape, by marker location; green squares: truth) into DIR, which must not be
in the repository (the images are not ours to publish). The loaders are reused by
tests/test_ihc.py (imported by path).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tilscore.scoring.ihc import deconvolve, estimate_stain_vectors  # noqa: E402
from tilscore.scoring.ihc_detect import detect_cells, ihc_params  # noqa: E402
from tilscore.training.metrics import DetectionScore, detection_score, match_points  # noqa: E402

MATCH_RADIUS_UM = 4.0
JUDGED_RADIUS_UM = 1.5  # an unmatched call with no labelled pixel this close is not judged
KI67_MPP, NUCLICK_MPP = 0.25, 0.12
MIN_TRUTH_AREA_UM2 = 2.0  # truth components smaller than this are annotation specks
THRESHOLD_GRID = (0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.2)  # DAB excess, OD
NAIVE_GRID = [(t, a) for t in (0.15, 0.3, 0.5) for a in (5.0, 15.0)]  # (DAB OD, µm²)


class Item(NamedTuple):
    """One labelled image. truth_xy: float64 (n, 2) x, y px of the true positive cells;
    annotated: bool (H, W) pixels carrying any label (None: not known); ignore_xy:
    (m, 2) positions where a call is neither right nor wrong (None: none)."""

    name: str
    rgb: np.ndarray
    truth_xy: np.ndarray
    mpp: float
    annotated: np.ndarray | None = None
    ignore_xy: np.ndarray | None = None


def _centroids(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """float64 (n, 2) x, y centroids (pixel centres at +0.5) of 8-connected components
    of at least `min_area_px` pixels."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2))
    idx = np.arange(1, n + 1)
    area = ndi.sum(mask, lab, idx)
    cy_cx = np.array(ndi.center_of_mass(mask, lab, idx)).reshape(-1, 2)
    return cy_cx[area >= min_area_px][:, ::-1] + 0.5


def load_ki67(folder: Path) -> list[Item]:
    """Ki67 tiles; truth = red components; `annotated` = red, green or blue pixels."""
    from PIL import Image

    items = []
    for img_path in sorted((folder / "images").glob("*.png")):
        rgb = np.asarray(Image.open(img_path).convert("RGB"))
        m = np.asarray(Image.open(folder / "masks" / img_path.name).convert("RGB")).astype(int)
        red = (m[..., 0] > 127) & (m[..., 0] > m[..., 1]) & (m[..., 0] > m[..., 2])
        truth = _centroids(red, MIN_TRUTH_AREA_UM2 / KI67_MPP**2)
        items.append(Item(img_path.stem, rgb, truth, KI67_MPP, m.max(axis=-1) > 127))
    return items


def load_nuclick(folder: Path) -> list[Item]:
    """CD3/CD8 crops; truth = annotated lymphocytes (no negatives are annotated)."""
    from PIL import Image

    items = []
    for img_path in sorted((folder / "images").glob("*.jpg")):
        rgb = np.asarray(Image.open(img_path).convert("RGB"))
        mask = np.asarray(Image.open(folder / "masks" / img_path.name).convert("L")) >= 128
        truth = _centroids(mask, MIN_TRUTH_AREA_UM2 / NUCLICK_MPP**2)
        items.append(Item(img_path.stem, rgb, truth, NUCLICK_MPP))
    return items


def load_synthetic(stain: str, seeds=(1, 2, 3), size_px: int = 512, downsample: float = 2.0,
                   scene_px: int = 4096, margin_um: float = 5.0,
                   supersample_um: float | None = None) -> list[Item]:
    """Tiles from the centre of synthetic scenes (0.25 µm/px level 0, rendered at
    `downsample`; `supersample_um` as in SyntheticScene.render, None = area-averaged from
    level 0); positives centred within `margin_um` outside the tile are ignore points."""
    from tilscore.synth.scene import SyntheticScene

    items = []
    for seed in seeds:
        scene = SyntheticScene(scene_px, scene_px, mpp=0.25, stain=stain, seed=seed)
        x0 = y0 = (scene_px - size_px * downsample) / 2
        x1 = y1 = x0 + size_px * downsample
        m = margin_um / 0.25
        rgb = scene.render(x0, y0, width=size_px, height=size_px, downsample=downsample,
                           supersample_um=supersample_um)
        cells = scene.cells(x0 - m, y0 - m, x1=x1 + m, y1=y1 + m)
        xy = np.stack([(cells["x_px"] - x0) / downsample, (cells["y_px"] - y0) / downsample], 1)
        inside = ((cells["x_px"] >= x0) & (cells["x_px"] < x1)
                  & (cells["y_px"] >= y0) & (cells["y_px"] < y1))
        pos = cells["positive"]
        items.append(Item(f"{stain}-seed{seed}", rgb, xy[pos & inside], 0.25 * downsample,
                          ignore_xy=xy[pos & ~inside]))
    return items


def detector_cells(rgb: np.ndarray, mpp: float, marker: str, device: str = "cpu",
                   calibrate: bool = True, params=None):
    """tilscore's :class:`~tilscore.scoring.ihc_detect.CellsOnTile` of one image (on the CPU).
    `calibrate`: stain vectors and glass colour estimated on the image itself (it plays
    its own slide thumbnail), else the Ruifrok defaults with glass at 255."""
    batch = torch.from_numpy(np.array(rgb))[None].to(device)
    stains = estimate_stain_vectors(rgb) if calibrate else None
    cells = detect_cells(batch, mpp, marker=marker, params=params, stain_matrix=stains)[0]
    return type(cells)(**{k: getattr(cells, k).cpu() for k in cells.__dataclass_fields__})


def detector_candidates(rgb: np.ndarray, mpp: float, marker: str, device: str = "cpu",
                        calibrate: bool = True, params=None
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All of tilscore's cells in one image, positive or not: (float64 (n, 2) x, y px,
    float64 (n,) DAB excess = compartment mean - local background, OD, bool (n,) passed
    every gate), so that any ``dab_threshold_od`` at or above the one in `params` can be
    applied afterwards without detecting again (arguments as :func:`detector_cells`)."""
    cells = detector_cells(rgb, mpp, marker, device, calibrate, params)
    xy = torch.stack([cells.x_px, cells.y_px], 1).numpy().astype(np.float64)
    excess = (cells.dab_od - cells.dab_background_od).numpy().astype(np.float64)
    return xy, excess, (cells.gate == 0).numpy()


def detector_positives(rgb: np.ndarray, mpp: float, marker: str, device: str = "cpu",
                       calibrate: bool = True, params=None) -> np.ndarray:
    """float64 (n, 2) x, y px of tilscore's positive cells in one image (arguments as
    :func:`detector_cells`)."""
    cells = detector_cells(rgb, mpp, marker, device, calibrate, params)
    return torch.stack([cells.x_px, cells.y_px], 1).numpy().astype(np.float64)[
        cells.positive.numpy()]


def threshold_cv(items, marker: str, grid=THRESHOLD_GRID, params=None, **kw):
    """Leave-one-image-out check of choosing ``dab_threshold_od`` on labelled data: for
    each image, the grid value with the best strict F1 on the *other* images is applied
    to it. Returns (pooled DetectionScore over the held-out images, [chosen threshold per
    image]). Detection runs once per image, at the lowest threshold of the grid (the
    threshold only splits its cells)."""
    params = replace(params or ihc_params(marker), dab_threshold_od=min(grid))
    cands = [detector_candidates(it.rgb, it.mpp, marker, params=params, **kw)
             for it in items]
    per = {t: [evaluate([it], lambda rgb, mpp, c=c, t=t: c[0][(c[1] >= t) & c[2]])[0]
               for it, c in zip(items, cands, strict=True)] for t in grid}

    def f1_without(i: int, t: float) -> float:
        return sum((s for j, s in enumerate(per[t]) if j != i), DetectionScore(0, 0, 0)).f1

    total, chosen = DetectionScore(0, 0, 0), []
    for i in range(len(items)):
        best = max(grid, key=lambda t, i=i: f1_without(i, t))
        chosen.append(best)
        total = total + per[best][i]
    return total, chosen


def naive_positives(rgb: np.ndarray, mpp: float, dab_threshold_od: float = 0.3,
                    min_area_um2: float = 15.0) -> np.ndarray:
    """Naive baseline: Ruifrok deconvolution (glass 255), DAB >= threshold, one call per
    8-connected component of at least `min_area_um2`, at its centroid."""
    dab = deconvolve(torch.from_numpy(np.array(rgb))[None])[0, 1].numpy()
    return _centroids(dab >= dab_threshold_od, min_area_um2 / mpp**2)


def _unjudged(pred: np.ndarray, annotated: np.ndarray, radius_px: float) -> np.ndarray:
    """bool (n,): calls with no annotated pixel within `radius_px` (unlabelled tissue)."""
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(~annotated)
    ix = np.clip(pred[:, 0].astype(int), 0, annotated.shape[1] - 1)
    iy = np.clip(pred[:, 1].astype(int), 0, annotated.shape[0] - 1)
    return dist[iy, ix] > radius_px


def evaluate(items, find, radius_um: float = MATCH_RADIUS_UM, judged_only: bool = False):
    """(total DetectionScore, number of calls, per-image rows) of `find(rgb, mpp) -> xy`.

    Calls at an item's ignore points are dropped (not counted as calls either).
    judged_only: also drop unmatched calls farther than JUDGED_RADIUS_UM from any
    labelled pixel (for items with an `annotated` mask)."""
    total, calls, per_image = DetectionScore(0, 0, 0), 0, []
    for item in items:
        pred = find(item.rgb, item.mpp)
        r_px = radius_um / item.mpp
        matched = match_points(pred, item.truth_xy, radius=r_px) >= 0
        drop = np.zeros(len(pred), bool)
        if item.ignore_xy is not None and len(item.ignore_xy) and len(pred):
            drop |= ~matched & (match_points(pred, item.ignore_xy, radius=r_px) >= 0)
        if judged_only and item.annotated is not None and len(pred):
            drop |= ~matched & _unjudged(pred, item.annotated, JUDGED_RADIUS_UM / item.mpp)
        score = detection_score(pred[~drop], item.truth_xy, radius=r_px)
        total, calls = total + score, calls + int((~drop).sum())
        per_image.append((item.name, score, int((~drop).sum()), len(item.truth_xy)))
    return total, calls, per_image


def _row(label: str, score: DetectionScore, calls: int) -> str:
    n_true = max(score.tp + score.fn, 1)
    return (f"| {label} | {score.tp} | {score.fp} | {score.fn} | {score.precision:.3f} | "
            f"{score.recall:.3f} | {score.f1:.3f} | {calls / n_true:.2f} |")


def _best_naive(items, judged_only=False, key="f1"):
    """The naive baseline at its best setting (by `key`: "f1" or "recall") on these items,
    as (label, score, calls)."""
    best = None
    for thr, area in NAIVE_GRID:
        score, calls, _ = evaluate(items, lambda rgb, mpp, t=thr, a=area: naive_positives(
            rgb, mpp, t, a), judged_only=judged_only)
        if best is None or getattr(score, key) > getattr(best[1], key):
            best = (f"naive, best {key} (DAB ≥ {thr}, ≥ {area:g} µm²)", score, calls)
    return best


SKIMAGE_MPP = 0.5  # scikit-image's immunohistochemistry() sample, approximately
BORDER_PX = 10
CONSEP_IMAGES = 12  # the first N of the 27 CoNSeP images (the gate check; ~1,000 per class)


def edge_rates(cells_csv: Path, width: int, height: int, border_px: int = BORDER_PX):
    """(cells, positives, % positive, % positive within `border_px` of the image edge,
    % positive further in) of a ``cells.csv`` of a `width` x `height` px image."""
    import csv

    with open(cells_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([float(r["x_px"]) for r in rows])
    y = np.array([float(r["y_px"]) for r in rows])
    pos = np.array([r["class"].endswith("_positive") for r in rows], bool)
    edge = (x < border_px) | (y < border_px) | (x >= width - border_px) | (y >= height - border_px)

    def pct(m):
        return 100.0 * pos[m].mean() if m.any() else float("nan")

    return len(pos), int(pos.sum()), pct(np.ones_like(pos)), pct(edge), pct(~edge)


def specificity_skimage(work: Path, device: str = "cpu") -> list[tuple]:
    """Score scikit-image's IHC sample (no stained lymphocytes) as CD20 and as FOXP3 with
    ``tilscore score --model none`` into `work`; one :func:`edge_rates` row per stain."""
    from PIL import Image
    from skimage.data import immunohistochemistry

    from tilscore.cli import main as cli

    rgb = immunohistochemistry()
    png = work / "skimage_ihc.png"
    Image.fromarray(rgb).save(png)
    rows = []
    for stain in ("cd20", "foxp3"):
        out = work / stain
        with contextlib.redirect_stdout(io.StringIO()):  # the command's one-line summaries
            code = cli(["score", str(png), "--stain", stain, "--mpp", str(SKIMAGE_MPP),
                        "--model", "none", "--out", str(out), "--device", device, "-q",
                        "--no-report"])
        if code != 0:
            raise RuntimeError(f"tilscore score failed ({code}) on {png}")
        rows.append((stain, *edge_rates(out / "skimage_ihc" / "cells.csv", rgb.shape[1],
                                        rgb.shape[0])))
    return rows


def gate_on_consep(folder: Path, n_images: int = CONSEP_IMAGES, radius_um: float = 3.0):
    """{class: (nuclei matched by a candidate, share that passes the lymphocyte gate)} on
    CoNSeP's typed H&E nuclei: the haematoxylin of an H&E deconvolution (eosin takes the
    second stain's place and is left out of the nuclear stain)."""
    import json

    from PIL import Image

    from tilscore.scoring.ihc import EOSIN_OD, HAEMATOXYLIN_OD, StainVectors, stain_matrix

    he = StainVectors(stain_matrix(HAEMATOXYLIN_OD, EOSIN_OD), "default")
    params = ihc_params("foxp3", dab_weight=0.0, segment_dab_weight=0.0)
    passed: dict[str, list] = {}
    for path in sorted((folder / "points").glob("*.json"))[:n_images]:
        meta = json.loads(path.read_text())
        rgb = np.array(Image.open(folder / "images" / f"{path.stem}.png").convert("RGB"))
        cells = detect_cells(torch.from_numpy(rgb)[None], meta["mpp"], marker="foxp3",
                             params=params, stain_matrix=he)[0]
        xy = torch.stack([cells.x_px, cells.y_px], 1).numpy().astype(np.float64)
        ok = (cells.gate == 0).numpy()
        for cls in ("inflammatory", "epithelial", "spindle"):
            truth = np.array(meta["points"][cls], np.float64).reshape(-1, 2)
            match = match_points(truth, xy, radius=radius_um / meta["mpp"])
            passed.setdefault(cls, []).append(ok[match[match >= 0]])
    return {cls: (int(sum(len(p) for p in parts)),
                  float(np.concatenate(parts).mean()) if parts else float("nan"))
            for cls, parts in passed.items()}


EDGE_BAND_UM, EDGE_FAR_UM = 5.0, 10.0  # the crop-edge band; cells this far from the image's edge


def _clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) 1 - alpha interval of a binomial proportion k / n."""
    from scipy.stats import beta

    lo = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def edge_effect_on_crops(images, marker: str, crop_um: float, step_um: float,
                         device: str = "cpu", n_boot: int = 2000, seed: int = 0) -> dict:
    """The positive rate against the distance to an image's edge, measured on sliding
    crops of larger real images (`images`: [(rgb, mpp)]): each crop is scored by the
    detector with its whole image's stain vectors, and only cells at least EDGE_FAR_UM
    from the whole image's edge count (so the same cells have full context there).

    Returns {crops, edge_cells, edge_pos, inner_cells, inner_pos, ratio (edge rate /
    inner rate), ratio_ci (bootstrap over crops, 95 %; crops overlap, so it is narrower
    than independent crops would give), edge_ci (Clopper-Pearson of the edge rate),
    paired_cells, paired_pos_whole, paired_kept, paired_new} where the paired figures
    are the whole image's cells centred within EDGE_BAND_UM of a crop's edge: positive
    in the whole image, still positive in the crop, and negative in the whole image but
    positive in the crop."""
    rng = np.random.default_rng(seed)
    per_crop, paired = [], np.zeros(4, int)
    for rgb, mpp in images:
        stains = estimate_stain_vectors(rgb)
        whole = detect_cells(torch.from_numpy(np.array(rgb))[None].to(device), mpp, marker=marker,
                             params=None, stain_matrix=stains)[0]
        wxy = torch.stack([whole.x_px, whole.y_px], 1).cpu().numpy()
        wpos = whole.positive.cpu().numpy()
        h, w = rgb.shape[:2]
        size, step = int(round(crop_um / mpp)), int(round(step_um / mpp))
        band, far = EDGE_BAND_UM / mpp, EDGE_FAR_UM / mpp
        w_ok = ((wxy >= far).all(1) & (wxy[:, 0] < w - far) & (wxy[:, 1] < h - far))
        origins = [(x0, y0) for y0 in range(0, h - size + 1, step)
                   for x0 in range(0, w - size + 1, step)]
        batch = torch.from_numpy(np.stack([np.ascontiguousarray(rgb[y0:y0 + size,
                                                                    x0:x0 + size])
                                           for x0, y0 in origins])).to(device)
        for (x0, y0), cells in zip(origins,
                                   detect_cells(batch, mpp, marker=marker, params=None,
                                                stain_matrix=stains),
                                   strict=True):
            xy = torch.stack([cells.x_px, cells.y_px], 1).cpu().numpy()
            pos = cells.positive.cpu().numpy()
            g = xy + [x0, y0]
            ok = (g >= far).all(1) & (g[:, 0] < w - far) & (g[:, 1] < h - far)
            dist = np.minimum(xy.min(1), (size - xy).min(1))
            edge, inner = ok & (dist < band), ok & (dist >= band)
            per_crop.append((edge.sum(), pos[edge].sum(), inner.sum(), pos[inner].sum()))
            local = wxy - [x0, y0]
            wdist = np.minimum(local.min(1), (size - local).min(1))
            sel = w_ok & (wdist >= 0) & (wdist < band)
            if sel.any():
                m = match_points(local[sel], xy, MATCH_RADIUS_UM / mpp)
                now = (m >= 0) & pos[np.maximum(m, 0)]
                paired += [sel.sum(), wpos[sel].sum(), (wpos[sel] & now).sum(),
                           (~wpos[sel] & now).sum()]
    a = np.array(per_crop, float)
    t = a.sum(0)
    ratio = (t[1] / t[0]) / (t[3] / t[2]) if t[0] and t[3] else float("nan")
    boots = []
    for _ in range(n_boot):
        s = a[rng.integers(0, len(a), len(a))].sum(0)
        if s[0] and s[2] and s[3]:
            boots.append((s[1] / s[0]) / (s[3] / s[2]))
    ci = tuple(np.percentile(boots, [2.5, 97.5])) if boots else (float("nan"),) * 2
    return {"crops": len(a), "edge_cells": int(t[0]), "edge_pos": int(t[1]),
            "inner_cells": int(t[2]), "inner_pos": int(t[3]), "ratio": ratio,
            "ratio_ci": ci, "edge_ci": _clopper_pearson(int(t[1]), int(t[0])),
            "paired_cells": int(paired[0]), "paired_pos_whole": int(paired[1]),
            "paired_kept": int(paired[2]), "paired_new": int(paired[3])}


def edge_table(data: Path, device: str = "cpu") -> list[str]:
    """Markdown rows of :func:`edge_effect_on_crops` on the real IHC images at hand."""
    from skimage.data import immunohistochemistry

    sets = [("scikit-image sample", "foxp3", [(immunohistochemistry(), SKIMAGE_MPP)], 100, 25),
            ("scikit-image sample", "cd20", [(immunohistochemistry(), SKIMAGE_MPP)], 100, 25)]
    if (data / "ihc-ki67-deepliif").exists():
        sets.append(("Ki67 DeepLIIF (4 tiles)", "foxp3",
                     [(it.rgb, it.mpp) for it in load_ki67(data / "ihc-ki67-deepliif")], 64, 16))
    if (data / "ihc-cd3cd8-nuclick").exists():
        sets.append(("CD3/CD8 NuClick (16 crops)", "cd20",
                     [(it.rgb, it.mpp) for it in load_nuclick(data / "ihc-cd3cd8-nuclick")],
                     36, 8))
    rows = []
    for label, marker, images, crop_um, step_um in sets:
        r = edge_effect_on_crops(images, marker, crop_um, step_um, device)
        rows.append(
            f"| {label}, {marker}, {r['crops']} crops of {crop_um} µm | "
            f"{r['edge_pos']}/{r['edge_cells']} = "
            f"{100 * r['edge_pos'] / max(r['edge_cells'], 1):.2f} % "
            f"({100 * r['edge_ci'][0]:.2f}-{100 * r['edge_ci'][1]:.2f}) | "
            f"{r['inner_pos']}/{r['inner_cells']} = "
            f"{100 * r['inner_pos'] / max(r['inner_cells'], 1):.2f} % | {r['ratio']:.2f} "
            f"({r['ratio_ci'][0]:.2f}-{r['ratio_ci'][1]:.2f}) | {r['paired_pos_whole']} → "
            f"{r['paired_kept']} kept, {r['paired_new']} new (of {r['paired_cells']}) |")
    return rows


OVERLAY_COLOURS = {0: (0, 160, 255), 1: (150, 150, 150), 2: (255, 150, 0), 3: (200, 0, 200),
                   4: (0, 200, 0)}  # by gate code; positives red


def write_overlay(path: Path, rgb: np.ndarray, cells, truth_xy=None, scale: int = 1) -> None:
    """PNG of `rgb` with `cells` drawn (see the module docstring for the colours)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(rgb))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.LANCZOS)
    draw = ImageDraw.Draw(img)
    for x, y, pos, gate in zip(cells.x_px.tolist(), cells.y_px.tolist(),
                               cells.positive.tolist(), cells.gate.tolist(), strict=True):
        x, y = x * scale, y * scale
        r, colour, width = (5, (230, 0, 0), 3) if pos else (3, OVERLAY_COLOURS[gate], 2)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)
    for x, y in (truth_xy if truth_xy is not None else []):
        draw.rectangle([x * scale - 7, y * scale - 7, x * scale + 7, y * scale + 7],
                       outline=(0, 255, 0), width=2)
    img.save(path)


def _csv_cells(path: Path):
    """(x, y, positive, gate code) arrays of a cells.csv (gate "passed" when absent)."""
    import csv

    from tilscore.scoring.ihc_detect import GATES

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([float(r["x_px"]) for r in rows]), np.array([float(r["y_px"]) for r in rows]),
            np.array([r["class"].endswith("_positive") for r in rows], bool),
            np.array([GATES.index(r.get("gate") or "passed") for r in rows], int))


def docs_figure(png: Path, panels: list[tuple[str, Path]], crop=(0, 0, 256, 256),
                scale: int = 2) -> None:
    """The overlay in docs/ihc.md: a crop of scikit-image's IHC sample with the cells of
    each ``cells.csv`` in `panels` ((title, path), side by side), drawn as in
    :func:`write_overlay`; saved as a 256-colour PNG."""
    from PIL import Image, ImageDraw
    from skimage.data import immunohistochemistry

    x0, y0, x1, y1 = crop
    base = Image.fromarray(np.ascontiguousarray(immunohistochemistry()[y0:y1, x0:x1]))
    base = base.resize(((x1 - x0) * scale, (y1 - y0) * scale), Image.LANCZOS)
    sheet = Image.new("RGB", (base.width * len(panels), base.height + 18), "white")
    for k, (title, path) in enumerate(panels):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for x, y, pos, gate in zip(*_csv_cells(path), strict=True):
            x, y = (x - x0) * scale, (y - y0) * scale
            if not (0 <= x < img.width and 0 <= y < img.height):
                continue
            r, colour, width = (5, (230, 0, 0), 3) if pos else (3, OVERLAY_COLOURS[gate], 2)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)
        sheet.paste(img, (k * base.width, 18))
        ImageDraw.Draw(sheet).text((k * base.width + 4, 3), title, fill=(0, 0, 0))
    sheet.quantize(256).save(png, optimize=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-calibrate", action="store_true", help="Ruifrok defaults, glass 255")
    ap.add_argument("--per-image", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also sweep dab_threshold_od")
    ap.add_argument("--overlays", type=Path, help="write overlays of the real images here")
    ap.add_argument("--docs-figure", type=Path, metavar="PNG",
                    help="only write the docs/ihc.md overlay of scikit-image's IHC sample "
                         "(CD20), with --before-cells CSV drawn beside it")
    ap.add_argument("--before-cells", type=Path, metavar="CSV")
    ap.add_argument("--edge-crops", action="store_true",
                    help="only measure the positive rate against the distance to an edge "
                         "on sliding crops of the real images")
    args = ap.parse_args(argv)
    if args.edge_crops:
        print(f"| crops (band: within {EDGE_BAND_UM:g} µm of the crop's edge) | band: positive "
              "(95 % exact CI) | further in | ratio (bootstrap 95 %) | the whole image's "
              "positives centred in the band: kept in the crop, new |\n|---|---|---|---|---|")
        print("\n".join(edge_table(args.data, args.device)))
        return 0
    if args.docs_figure is not None:
        with tempfile.TemporaryDirectory() as tmp:
            specificity_skimage(Path(tmp), args.device)
            panels = ([("before (commit 07797af)", args.before_cells)]
                      if args.before_cells else [])
            panels.append(("after", Path(tmp) / "cd20" / "skimage_ihc" / "cells.csv"))
            docs_figure(args.docs_figure, panels)
        return 0
    calibrate = not args.no_calibrate
    if args.overlays is not None:
        if args.overlays.resolve().is_relative_to(REPO):
            ap.error("--overlays must be outside the repository (shared data stay out of it)")
        args.overlays.mkdir(parents=True, exist_ok=True)

    def ours(marker, **overrides):
        params = ihc_params(marker, **overrides)
        return lambda rgb, mpp: detector_positives(rgb, mpp, marker, args.device, calibrate,
                                                   params)

    print("| dataset: method | TP | FP | FN | precision | recall | F1 | calls per true cell |")
    print("|---|---|---|---|---|---|---|---|")
    per_image, sweeps = [], []
    # Ki67 marks tumour cells too: its sensitivity runs the nuclear rule without the gate
    real = [("Ki67 DeepLIIF", "ihc-ki67-deepliif", load_ki67, "foxp3",
             {"lymphocyte_gate": False}, "foxp3 rules without the lymphocyte gate"),
            ("CD3/CD8 NuClick", "ihc-cd3cd8-nuclick", load_nuclick, "cd20", {},
             "cd20 rules with the lymphocyte gate")]
    for label, sub, loader, marker, rule, words in real:
        if not (args.data / sub).exists():
            print(f"| {label}: missing {args.data / sub} | | | | | | | |")
            continue
        items = loader(args.data / sub)
        score, calls, detail = evaluate(items, ours(marker, **rule))
        per_image += detail
        print(_row(f"{label}: tilscore, {words}", score, calls))
        if rule:
            score, calls, _ = evaluate(items, ours(marker))
            print(_row(f"{label}: tilscore, {marker} rules with the gate", score, calls))
        for key in ("f1", "recall"):
            naive = _best_naive(items, key=key)
            print(_row(f"{label}: {naive[0]}", *naive[1:]))
        if marker == "foxp3":  # the nuclear threshold was chosen on this set: how well
            # does choosing it generalise to an image it was not chosen on?
            score, chosen = threshold_cv(items, marker, params=ihc_params(marker, **rule),
                                         device=args.device, calibrate=calibrate)
            print(_row(f"{label}: leave-one-image-out threshold (chosen "
                       f"{'/'.join(f'{t:g}' for t in chosen)} OD)", score,
                       score.tp + score.fp))
        if items[0].annotated is not None:
            score, calls, _ = evaluate(items, ours(marker, **rule), judged_only=True)
            print(_row(f"{label}, judged calls only: tilscore", score, calls))
            naive = _best_naive(items, judged_only=True)
            print(_row(f"{label}, judged calls only: {naive[0]}", *naive[1:]))
        if args.sweep:
            for thr in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
                find = ours(marker, dab_threshold_od=thr, **rule)
                score, calls, _ = evaluate(items, find)
                judged = (evaluate(items, find, judged_only=True)[0]
                          if items[0].annotated is not None else None)
                sweeps.append((label, thr, score, calls, judged))
        if args.overlays is not None:
            params = ihc_params(marker, **rule)
            for it in items:
                cells = detector_cells(it.rgb, it.mpp, marker, args.device, calibrate, params)
                write_overlay(args.overlays / f"{sub}_{it.name}.png", it.rgb, cells,
                              it.truth_xy)
    for stain in ("foxp3", "cd20"):
        items = load_synthetic(stain)
        score, calls, detail = evaluate(items, ours(stain))
        per_image += detail
        print(_row(f"synthetic {stain}, 0.5 µm/px: tilscore (count ratio "
                   f"{calls / max(score.tp + score.fn, 1):.3f})", score, calls))
        naive = _best_naive(items)
        print(_row(f"synthetic {stain}: {naive[0]}", *naive[1:]))
    he = load_synthetic("he")
    area_mm2 = sum(it.rgb.shape[0] * it.rgb.shape[1] * it.mpp**2 for it in he) * 1e-6
    for marker in ("foxp3", "cd20"):
        n = sum(len(ours(marker)(it.rgb, it.mpp)) for it in he)
        print(f"| synthetic H&E scored as {marker}: {n} positives in {area_mm2:.3f} mm² "
              f"({n / area_mm2:.1f} per mm²) | | | | | | | |")

    print("\n| real IHC without stained lymphocytes | cells | positive | % positive | "
          f"% within {BORDER_PX} px of the edge | % further in |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for stain, n, pos, pct, edge, inner in specificity_skimage(Path(tmp), args.device):
            print(f"| skimage immunohistochemistry(), tilscore score --stain {stain} --model "
                  f"none | {n} | {pos} | {pct:.1f} | {edge:.1f} | {inner:.1f} |")
    if (args.data / "ihc-ki67-deepliif").exists():
        items = load_ki67(args.data / "ihc-ki67-deepliif")
        n_true = sum(len(it.truth_xy) for it in items)
        for words, rule in (("without", {"lymphocyte_gate": False}), ("with", {})):
            n = sum(len(ours("foxp3", **rule)(it.rgb, it.mpp)) for it in items)
            print(f"| Ki67 DeepLIIF tiles scored as FOXP3 {words} the gate ({n_true} Ki67+ "
                  f"nuclei, mostly tumour) | | {n} | | | |")
    if args.overlays is not None:
        from skimage.data import immunohistochemistry

        rgb = immunohistochemistry()
        for stain in ("cd20", "foxp3"):
            cells = detector_cells(rgb, SKIMAGE_MPP, stain, args.device, calibrate)
            write_overlay(args.overlays / f"skimage_{stain}.png", rgb, cells)

    if (args.data / "he-consep").exists():
        print("\n| CoNSeP H&E nuclei (haematoxylin only) | matched by a candidate | "
              "pass the lymphocyte gate |\n|---|---|---|")
        for cls, (n, share) in gate_on_consep(args.data / "he-consep").items():
            print(f"| {cls} | {n} | {100 * share:.1f} % |")
    if args.per_image:
        print("\n| image | TP | FP | FN | calls | truth |\n|---|---|---|---|---|---|")
        for name, s, calls, n_true in per_image:
            print(f"| {name} | {s.tp} | {s.fp} | {s.fn} | {calls} | {n_true} |")
    if sweeps:
        print("\n| dataset | dab_threshold_od | recall | precision | F1 | calls per true cell |"
              " judged F1 |\n|---|---|---|---|---|---|---|")
        for label, thr, s, calls, judged in sweeps:
            jf1 = f"{judged.f1:.3f}" if judged is not None else ""
            print(f"| {label} | {thr} | {s.recall:.3f} | {s.precision:.3f} | {s.f1:.3f} | "
                  f"{calls / max(s.tp + s.fn, 1):.2f} | {jf1} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
