#!/usr/bin/env python
"""Experiment behind docs/ihc.md (not shipped): ihc-default's U-Net fine-tuned as the
membranous-cell detector on the NuClick CD3/CD8 crops' annotated cells.

Gaussian heatmap targets on the lymphocyte channel at 0.5 µm/px, 4-fold cross-validation
by crop (each crop is scored by a network that never saw it), rotation, flip and intensity
augmentation; prints recall and calls per annotated cell of the held-out heatmaps' peaks
at each threshold (4 µm one-to-one matching, as scripts/validate_ihc.py).

    .venv/bin/python scripts/experiment_nuclick_unet.py [--steps 400] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import validate_ihc  # noqa: E402

from tilscore.engine.infer import find_peaks  # noqa: E402
from tilscore.models import load_model  # noqa: E402
from tilscore.training.metrics import detection_score  # noqa: E402

MPP = 0.5  # the network's
PAD_PX = 128  # a 512 px crop at 0.12 µm/px is 123 px at 0.5 µm/px
SIGMA_PX = 2.0
FOLDS = 4


def _heat_target(xy: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:PAD_PX, 0:PAD_PX] + 0.5
    t = np.zeros((PAD_PX, PAD_PX), np.float32)
    for x, y in xy:
        t = np.maximum(t, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * SIGMA_PX**2)))
    return t


def _batch(imgs, targets, idx, rng):
    xb, yb = [], []
    for i in idx:
        k = rng.integers(4)
        x, y = np.rot90(imgs[i], k), np.rot90(targets[i], k)
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        x = x.astype(np.float32) * rng.uniform(0.9, 1.1, 3) + rng.uniform(-10, 10)
        xb.append(np.clip(x, 0, 255).astype(np.uint8))
        yb.append(y.copy())
    x = torch.from_numpy(np.stack(xb)).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last), torch.from_numpy(np.stack(yb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items = validate_ihc.load_nuclick(args.data / "ihc-cd3cd8-nuclick")
    scale = validate_ihc.NUCLICK_MPP / MPP
    imgs, points, sides = [], [], []
    for it in items:
        n = int(round(it.rgb.shape[0] * scale))
        pad = np.full((PAD_PX, PAD_PX, 3), 255, np.uint8)
        pad[:n, :n] = np.asarray(Image.fromarray(it.rgb).resize((n, n), Image.BOX))
        imgs.append(pad)
        points.append(it.truth_xy * scale)
        sides.append(n)
    targets = [_heat_target(p) for p in points]
    heat = {}
    for fold in range(FOLDS):
        train = [i for i in range(len(items)) if i % FOLDS != fold]
        net, card = load_model("ihc-default")
        channel = len(card.region_classes) + card.cell_classes.index("lymphocyte")
        net = net.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=1e-4)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x, y = _batch(imgs, targets, rng.choice(train, 8), rng)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logit = net(x)[:, channel].float()
            loss = F.binary_cross_entropy_with_logits(logit, y, pos_weight=torch.tensor(20.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            for i in range(fold, len(items), FOLDS):
                x = torch.from_numpy(imgs[i][None]).permute(0, 3, 1, 2)
                heat[i] = torch.sigmoid(net(x)[:, channel : channel + 1].float())
        print(f"fold {fold}: {args.steps} steps in {time.perf_counter() - t0:.0f} s",
              flush=True)
    n_true = sum(len(p) for p in points)
    for thr in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        tp = calls = 0
        for i in range(len(items)):
            xy = find_peaks(heat[i], 7, threshold=thr).numpy()[:, 2:4]
            xy = xy[(xy < sides[i]).all(axis=1)]  # not in the padding
            tp += detection_score(xy, points[i], radius=validate_ihc.MATCH_RADIUS_UM / MPP).tp
            calls += len(xy)
        print(f"threshold {thr}: recall {tp / n_true:.3f}, calls per cell {calls / n_true:.2f}")


if __name__ == "__main__":
    main()
