"""Detection and segmentation metrics (pure functions).

Detections match ground-truth points one-to-one within a radius (greedy by distance,
via a KD-tree, so slide-scale point sets are fine). Predictions within the radius of an
*ignored* point (a nucleus that carries no class) count neither right nor wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class DetectionScore:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def __add__(self, other: DetectionScore) -> DetectionScore:
        return DetectionScore(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    def as_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


def match_points(pred_xy: np.ndarray, true_xy: np.ndarray, *, radius: float) -> np.ndarray:
    """Greedy one-to-one matching by increasing distance (≤ radius).

    Returns int (n_pred,) index of the matched true point, or -1.
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    match = np.full(len(pred_xy), -1, dtype=np.int64)
    if len(pred_xy) == 0 or len(true_xy) == 0:
        return match
    pairs = cKDTree(pred_xy).sparse_distance_matrix(cKDTree(true_xy), radius, output_type="ndarray")
    if len(pairs) == 0:
        return match
    pairs = pairs[np.argsort(pairs["v"], kind="stable")]
    used_true = np.zeros(len(true_xy), dtype=bool)
    for i, j in zip(pairs["i"], pairs["j"], strict=True):
        if match[i] < 0 and not used_true[j]:
            match[i] = j
            used_true[j] = True
    return match


def detection_score(pred_xy: np.ndarray, true_xy: np.ndarray, *, radius: float,
                    ignore_xy: np.ndarray | None = None) -> DetectionScore:
    """TP/FP/FN of predictions vs truth. Unmatched predictions are matched one-to-one
    against `ignore_xy` (nuclei without a class): each ignored point excuses at most one
    prediction within `radius`; the others are false positives."""
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    match = match_points(pred_xy, true_xy, radius=radius)
    unmatched = match < 0
    if ignore_xy is not None and len(ignore_xy) and unmatched.any():
        near_ignored = match_points(pred_xy[unmatched], ignore_xy, radius=radius) >= 0
        fp = int((~near_ignored).sum())
    else:
        fp = int(unmatched.sum())
    tp = int((~unmatched).sum())
    return DetectionScore(tp=tp, fp=fp, fn=int(len(np.asarray(true_xy).reshape(-1, 2)) - tp))


def dice_per_class(pred: np.ndarray, true: np.ndarray, *, n_classes: int,
                   ignore: int = 255) -> dict[int, float]:
    """Dice of each class present in `true` or `pred` (pixels where true == ignore skipped)."""
    valid = true != ignore
    out = {}
    for c in range(n_classes):
        p, t = (pred == c) & valid, (true == c) & valid
        denom = p.sum() + t.sum()
        if denom:
            out[c] = float(2 * (p & t).sum() / denom)
    return out


def froc(scores_per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], radius: float,
         *, area_mm2: float, fp_per_mm2=(10, 20, 50, 100, 200, 300)) -> dict[float, float]:
    """TIGER-style FROC: sensitivity at given false positives per mm².

    `scores_per_image`: list of (pred_xy (N, 2), pred_score (N,), true_xy (M, 2)).
    """
    thresholds = np.unique(np.concatenate([s for _, s, _ in scores_per_image] or [np.zeros(0)]))
    n_true = sum(len(t) for _, _, t in scores_per_image)
    curve = []
    for thr in thresholds[:: max(1, len(thresholds) // 200)]:
        tot = DetectionScore(0, 0, 0)
        for xy, s, t in scores_per_image:
            tot = tot + detection_score(xy[s >= thr], t, radius=radius)
        curve.append((tot.fp / area_mm2, tot.tp / max(1, n_true)))
    result = {}
    for target in fp_per_mm2:
        ok = [sens for fp, sens in curve if fp <= target]
        result[float(target)] = max(ok) if ok else 0.0
    return result
