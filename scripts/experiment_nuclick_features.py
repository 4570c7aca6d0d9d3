#!/usr/bin/env python
"""Experiment behind docs/ihc.md (not shipped): a classifier on top of the membranous
detector's candidates on the NuClick CD3/CD8 crops, under leave-one-crop-out
cross-validation.

Candidates are tilscore's CD20 cells at any DAB excess >= 0.1 OD (scripts/validate_ihc.py
`detector_candidates`); a candidate's label is whether one-to-one 4 µm matching pairs it
with an annotated cell. Per candidate, 28 measurements at 0.25 µm/px of the image's own
deconvolution (stain vectors estimated on the crop): DAB and haematoxylin disc means,
DAB annulus means and contrast, DAB fill fractions, texture (local standard deviation,
high-frequency energy), DAB edge strength, focus (grey gradient, Laplacian energy), DAB
Laplacian-of-Gaussian blob responses at 2/3/4 µm, the 8-sector background statistics, the
crop's DAB 90th percentile, and the distance to the crop edge. Each crop is scored by
a logistic regression, gradient boosting and a random forest fitted on the other 15 crops;
the held-out scores are pooled and one threshold swept over them (so the operating point
is chosen on the pooled held-out scores: slightly optimistic). Prints, per classifier, the
best recall within 1.5 calls per annotated cell and the fewest calls reaching recall 0.90.

Needs scikit-learn, which tilscore does not depend on: ``.venv/bin/pip install
scikit-learn``.

    .venv/bin/python scripts/experiment_nuclick_features.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import validate_ihc  # noqa: E402

from tilscore.scoring.ihc import deconvolve, estimate_stain_vectors  # noqa: E402
from tilscore.scoring.ihc_detect import annulus_kernel, sector_kernels  # noqa: E402
from tilscore.training.metrics import detection_score, match_points  # noqa: E402

FEATURE_MPP = 0.25
MIN_EXCESS_OD = 0.1
MAX_CALLS_PER_CELL = 1.5
TARGET_RECALL = 0.90


def _ring_mean(img: np.ndarray, r_out_px: float, r_in_px: float = 0.0) -> np.ndarray:
    """Mean of `img` over the annulus r_in <= r < r_out (a disc for r_in 0) at every pixel
    (the detector's anti-aliased kernel)."""
    return ndi.correlate(img, annulus_kernel(r_in_px, r_out_px).double().numpy(),
                         mode="reflect")


def _at(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    ix = np.clip(xy[:, 0].astype(int), 0, img.shape[1] - 1)
    iy = np.clip(xy[:, 1].astype(int), 0, img.shape[0] - 1)
    return img[iy, ix]


def features(rgb: np.ndarray, mpp: float, xy: np.ndarray, excess: np.ndarray) -> np.ndarray:
    """float64 (n, 28) measurements of the candidates at `xy` (input px) in one image."""
    scale = mpp / FEATURE_MPP
    t = torch.from_numpy(np.array(rgb))[None].float().permute(0, 3, 1, 2)
    size = (round(rgb.shape[0] * scale), round(rgb.shape[1] * scale))
    small = F.interpolate(t, size=size, mode="bilinear", antialias=True)
    small = small.round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    conc = deconvolve(small, estimate_stain_vectors(rgb))[0].numpy()
    hx, dab = np.clip(conc[0], 0, None), np.clip(conc[1], 0, None)
    grey = small[0].float().mean(-1).numpy() / 255
    px = 1.0 / FEATURE_MPP  # px per µm
    p = xy * scale
    f = [excess]
    for r in (2, 3, 4):
        f += [_at(_ring_mean(dab, r * px), p), _at(_ring_mean(hx, r * px), p)]
    for a, b in ((4, 5.5), (5.5, 7), (7, 9)):
        f.append(_at(_ring_mean(dab, b * px, a * px), p))
    f.append(f[3] - f[8])  # DAB disc 3 µm - annulus 5.5-7 µm
    f += [_at(_ring_mean((dab > thr).astype(float), 4 * px), p) for thr in (0.3, 0.6, 1.0)]
    m1, m2 = _ring_mean(dab, 4 * px), _ring_mean(dab * dab, 4 * px)
    f.append(np.sqrt(np.clip(_at(m2 - m1 * m1, p), 0, None)))
    hf = dab - ndi.gaussian_filter(dab, 1.0 * px)
    f.append(np.sqrt(_at(_ring_mean(hf * hf, 4 * px), p)))
    f.append(_at(_ring_mean(np.hypot(ndi.sobel(dab, 0), ndi.sobel(dab, 1)), 5 * px, 2.5 * px), p))
    f.append(_at(_ring_mean(np.hypot(ndi.sobel(grey, 0), ndi.sobel(grey, 1)), 8 * px), p))
    lap = ndi.laplace(ndi.gaussian_filter(grey, 0.7))
    f.append(_at(_ring_mean(lap * lap, 8 * px), p))
    f += [_at(-(s**2) * ndi.gaussian_laplace(dab, s * px), p) for s in (2.0, 3.0, 4.0)]
    sectors = np.stack([_at(ndi.correlate(dab, k.double().numpy(), mode="reflect"), p)
                        for k in sector_kernels(5.5 * px, 7.5 * px, n=8)], 1)
    f += [sectors.min(1), sectors.max(1), np.median(sectors, 1)]
    d90 = np.percentile(dab, 90)
    f += [np.full(len(p), d90), f[3] / (d90 + 1e-3)]
    h, w = rgb.shape[:2]
    f.append(np.minimum.reduce([xy[:, 0], xy[:, 1], w - xy[:, 0], h - xy[:, 1]]) * mpp)
    return np.stack(f, 1)


def _classifiers():
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic regression": lambda: make_pipeline(
            StandardScaler(), LogisticRegression(C=0.3, max_iter=2000)),
        "gradient boosting": lambda: HistGradientBoostingClassifier(
            max_depth=3, learning_rate=0.05, max_iter=200, min_samples_leaf=10),
        "random forest": lambda: RandomForestClassifier(
            300, min_samples_leaf=3, random_state=0),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    folder = args.data / "ihc-cd3cd8-nuclick"
    if not folder.is_dir():
        print(f"error: {folder} not found", file=sys.stderr)
        return 2
    try:
        classifiers = _classifiers()
    except ImportError:
        print("error: needs scikit-learn (.venv/bin/pip install scikit-learn)", file=sys.stderr)
        return 2
    crops = []
    for item in validate_ihc.load_nuclick(folder):
        xy, excess, _ = validate_ihc.detector_candidates(item.rgb, item.mpp, "cd20")
        xy, excess = xy[excess >= MIN_EXCESS_OD], excess[excess >= MIN_EXCESS_OD]
        r_px = validate_ihc.MATCH_RADIUS_UM / item.mpp
        label = match_points(xy, item.truth_xy, radius=r_px) >= 0
        crops.append((item, xy, features(item.rgb, item.mpp, xy, excess), label, r_px))
    n_true = sum(len(c[0].truth_xy) for c in crops)
    reach = sum(detection_score(c[1], c[0].truth_xy, radius=c[4]).tp for c in crops)
    print(f"{len(crops)} crops, {n_true} annotated cells, {sum(len(c[1]) for c in crops)} "
          f"candidates reaching {reach}")
    print("| classifier (leave one crop out) | best recall within 1.5 calls per cell | "
          "fewest calls per cell at recall >= 0.90 |\n|---|---|---|")
    for name, make in classifiers.items():
        scores = []
        for i in range(len(crops)):
            rest = [c for j, c in enumerate(crops) if j != i]
            model = make().fit(np.concatenate([c[2] for c in rest]),
                               np.concatenate([c[3] for c in rest]))
            scores.append(model.predict_proba(crops[i][2])[:, 1])
        curve = []
        for thr in np.unique(np.concatenate(scores))[::-1]:
            tp = sum(detection_score(c[1][s >= thr], c[0].truth_xy, radius=c[4]).tp
                     for c, s in zip(crops, scores, strict=True))
            calls = sum(int((s >= thr).sum()) for s in scores)
            curve.append((tp / n_true, calls / n_true))
        within = max((p for p in curve if p[1] <= MAX_CALLS_PER_CELL), default=(0.0, 0.0))
        reaching = min((p for p in curve if p[0] >= TARGET_RECALL), key=lambda p: p[1],
                       default=(float("nan"), float("nan")))
        print(f"| {name} | {within[0]:.3f} at {within[1]:.2f} | {reaching[1]:.2f} "
              f"(recall {reaching[0]:.3f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
