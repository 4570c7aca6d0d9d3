#!/usr/bin/env python
"""Experiment behind docs/accuracy.md "Session 10" (not shipped): is he-default's
lymphocyte F1 limited by its classifier or by its candidates?

1. Candidates: peaks of the per-location maximum of he-default's four cell heatmaps
   (threshold 0.1, the card's NMS) on every CRCHP and CoNSeP tile at 0.5 µm/px; each is
   labelled with the class of the labelled nucleus it matches (nearest within 3.3 µm;
   "none" when there is none, skipped when that nucleus has no class).
2. A second-stage classifier is trained on the training split's candidates and replaces
   he-default's class on the validation split's candidates:
   ``mlp``: a one-hidden-layer MLP on the U-Net's own features at the candidate
   (hypercolumn: encoder stages 2-5, the decoder output, the heatmaps, the region
   softmax); ``cnn``: a small CNN on the 48 × 48 px (24 µm) RGB patch around it, trained
   from scratch with flips, rotations and colour jitter; ``base``: he-default's own class.
3. Prints, per lab, the best lymphocyte F1 of a threshold sweep (3.3 µm one-to-one,
   unclassified nuclei excused, as ``tilscore eval``), the share of labelled lymphocytes
   that have a candidate at all (one-to-one), and the class-agnostic nucleus-detection F1
   of the candidates.

    .venv/bin/python scripts/experiment_cell_classifier.py [--classifier base|mlp|cnn]
        [--data ../shared/data] [--cache /tmp/cell-candidates] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tilscore.engine.infer import find_peaks  # noqa: E402
from tilscore.models import load_model  # noqa: E402
from tilscore.training.eval_data import eval_tiles  # noqa: E402
from tilscore.training.metrics import DetectionScore, detection_score, match_points  # noqa: E402

SETS = ("he-crchp", "he-consep")
NONE = 4  # label of a candidate on no labelled nucleus (CELL_CODES take 0..3)
HALF_PX = 24  # patch half-size at 0.5 µm/px
RADIUS_UM = 3.3


def extract(data: Path, cache: Path) -> None:
    """Candidates with hypercolumn features, patches and labels, one .npz per set/split."""
    model, card = load_model("he-default")
    model.eval()
    r, c = len(card.region_classes), len(card.cell_classes)
    kernel = 2 * max(1, round(card.heatmap.nms_radius_um / card.input_mpp)) + 1
    radius_px = RADIUS_UM / card.input_mpp
    seen: dict[str, object] = {}
    model.backbone.encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("enc", o))
    model.backbone.decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("dec", o))
    for name in SETS:
        for split in ("train", "val"):
            tiles = eval_tiles(str(data / name), card.input_mpp, split=split)
            parts: dict[str, list] = {k: [] for k in ("feat", "patch", "label", "tile", "xy")}
            for index, tile in enumerate(tiles):
                x = torch.from_numpy(tile.image[None]).permute(0, 3, 1, 2)
                with torch.inference_mode():
                    logits = model(x).float()
                    heat = torch.sigmoid(logits[:, r:r + c])
                    peaks = find_peaks(heat.max(1, keepdim=True).values, kernel,
                                       threshold=0.1).numpy()
                    xy = peaks[:, 2:4]
                    h, w = tile.image.shape[:2]
                    grid = torch.from_numpy(np.stack([xy[:, 0] / w * 2 - 1,
                                                      xy[:, 1] / h * 2 - 1], 1)).float()
                    maps = [*seen["enc"][2:], seen["dec"], heat, torch.softmax(logits[:, :r], 1)]
                    feat = torch.cat([F.grid_sample(m.float(), grid[None, None],
                                                    align_corners=False)[0, :, 0].T
                                      for m in maps], 1)
                label = np.full(len(xy), NONE)
                if len(tile.points_xy) and len(xy):
                    dist, j = cKDTree(tile.points_xy).query(xy, distance_upper_bound=radius_px)
                    near = np.isfinite(dist)
                    label[near] = tile.point_cls[j[near]]
                padded = np.pad(tile.image, ((HALF_PX,) * 2, (HALF_PX,) * 2, (0, 0)),
                                mode="reflect")
                patches = [padded[int(y):int(y) + 2 * HALF_PX, int(x0):int(x0) + 2 * HALF_PX]
                           for x0, y in xy]
                parts["feat"].append(feat.numpy().astype(np.float16))
                parts["patch"].append(np.stack(patches) if patches else
                                      np.zeros((0, 2 * HALF_PX, 2 * HALF_PX, 3), np.uint8))
                parts["label"].append(label)
                parts["tile"].append(np.full(len(xy), index))
                parts["xy"].append(xy)
            np.savez_compressed(cache / f"{name}-{split}.npz",
                                **{k: np.concatenate(v) for k, v in parts.items()})
            print(f"{name} {split}: {len(tiles)} tiles, {sum(map(len, parts['label']))} "
                  "candidates", flush=True)


def patch_cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                         *block(64, 128), nn.MaxPool2d(2), *block(128, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(128, 5))


def train_classifier(kind: str, train: list[dict], *, seed: int = 0):
    """Fit `kind` on the candidates of `train`; returns predict(npz dict) -> (N, 5) probs."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    y = np.concatenate([d["label"] for d in train])
    keep = y >= 0
    if kind == "mlp":
        raw = np.concatenate([d["feat"] for d in train]).astype(np.float32)[keep]
        mu, sd = raw.mean(0), raw.std(0) + 1e-3

        def prep(a):
            return torch.from_numpy((a.astype(np.float32) - mu) / sd)
        net = nn.Sequential(nn.Linear(raw.shape[1], 256), nn.ReLU(), nn.Dropout(0.3),
                            nn.Linear(256, 5))
        epochs = 30
    else:
        raw = np.concatenate([d["patch"] for d in train])[keep]

        def prep(a):
            return (torch.from_numpy(a).permute(0, 3, 1, 2).float() - 128) / 64
        net = patch_cnn().to(memory_format=torch.channels_last)
        epochs = 12
    x, yt = prep(raw), torch.from_numpy(y[keep])
    counts = torch.tensor(np.bincount(y[keep], minlength=5), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=(counts.sum() / counts / 5).clamp(max=5))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    batch = 256
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3,
                                                total_steps=epochs * (len(yt) // batch + 1))
    start = time.time()
    for epoch in range(epochs):
        net.train()
        order, total = torch.randperm(len(yt)), 0.0
        for i in range(0, len(yt), batch):
            idx = order[i:i + batch]
            xb = x[idx]
            if kind == "cnn":  # dihedral flips and a colour jitter per patch
                if rng.random() < 0.5:
                    xb = xb.flip(3)
                xb = xb.rot90(int(rng.integers(4)), (2, 3))
                xb = (xb * (1 + 0.2 * (torch.rand(len(xb), 3, 1, 1) - 0.5))
                      + 0.3 * (torch.rand(len(xb), 3, 1, 1) - 0.5))
                xb = xb.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch}: loss {total / len(yt):.3f} ({time.time() - start:.0f} s)",
              flush=True)
    net.eval()

    @torch.no_grad()
    def predict(d: dict) -> np.ndarray:
        a = d["feat"] if kind == "mlp" else d["patch"]
        return torch.cat([torch.softmax(net(prep(a[i:i + 2048])), 1)
                          for i in range(0, len(a), 2048)]).numpy()
    return predict


def sweep_best(d: dict, tiles, score: np.ndarray, *, truth_of, excuse: bool):
    """Best (F1, P, R, threshold) of a threshold sweep of `score` per candidate."""
    best = (0.0, 0.0, 0.0, 0.0)
    for thr in np.arange(0.1, 0.95, 0.05):
        total = DetectionScore(0, 0, 0)
        for index, tile in enumerate(tiles):
            mine = (d["tile"] == index) & (score > thr)
            ignore = tile.points_xy[tile.point_cls < 0] if excuse else None
            total = total + detection_score(d["xy"][mine], truth_of(tile),
                                            radius=RADIUS_UM / 0.5, ignore_xy=ignore)
        if total.f1 > best[0]:
            best = (total.f1, total.precision, total.recall, round(float(thr), 2))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", choices=("base", "mlp", "cnn"), default="base")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cell-candidates"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    if not all((args.cache / f"{n}-{s}.npz").exists() for n in SETS for s in ("train", "val")):
        extract(args.data, args.cache)
    cands = {n: {s: dict(np.load(args.cache / f"{n}-{s}.npz")) for s in ("train", "val")}
             for n in SETS}
    predict = (None if args.classifier == "base" else
               train_classifier(args.classifier, [cands[n]["train"] for n in SETS]))
    for name in SETS:
        d = cands[name]["val"]
        tiles = eval_tiles(str(args.data / name), 0.5, split="val")
        heat = d["feat"][:, -8:-4].astype(np.float32)  # the four cell heatmaps
        if predict is None:
            p_lymph = np.where(heat.argmax(1) == 0, heat[:, 0], 0.0)
        else:
            p_lymph = predict(d)[:, 0]
        f1 = sweep_best(d, tiles, p_lymph, truth_of=lambda t: t.points_xy[t.point_cls == 0],
                        excuse=True)
        found = total = 0
        for index, tile in enumerate(tiles):
            truth = tile.points_xy[tile.point_cls == 0]
            found += int((match_points(truth, d["xy"][d["tile"] == index],
                                       radius=RADIUS_UM / 0.5) >= 0).sum())
            total += len(truth)
        nuclei = sweep_best(d, tiles, heat.max(1), truth_of=lambda t: t.points_xy,
                            excuse=False)
        print(f"{args.classifier} {name}: lymphocyte F1 {f1[0]:.3f} (P {f1[1]:.3f} R {f1[2]:.3f}"
              f" at {f1[3]:.2f}); lymphocytes with a candidate {found}/{total} = "
              f"{found / max(total, 1):.3f}; class-agnostic nucleus F1 {nuclei[0]:.3f} "
              f"(P {nuclei[1]:.3f} R {nuclei[2]:.3f} at {nuclei[3]:.2f})", flush=True)


if __name__ == "__main__":
    main()
