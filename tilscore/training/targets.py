"""Training targets from labels: region classes, cell-centre heatmaps, nucleus masks.

Pure numpy, one sample at a time (called in DataLoader workers).
"""

from __future__ import annotations

import numpy as np

IGNORE = 255  # region label meaning "unknown here": no loss


def gaussian_heatmaps(points_xy: np.ndarray, classes: np.ndarray, *, n_classes: int,
                      shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """float32 (n_classes, H, W): max of Gaussians at each point of each class, exactly 1
    at the pixel that holds the centre.

    `points_xy`: float (N, 2) pixel coordinates (pixel centres at .5); `classes`: int (N,)
    in [0, n_classes); points with a negative class or one >= n_classes (e.g. every
    point, for a region-only model) are skipped.
    """
    h, w = shape
    heat = np.zeros((n_classes, h, w), dtype=np.float32)
    r = int(np.ceil(3 * sigma_px))
    offs = np.arange(-r, r + 1)
    for (x, y), c in zip(points_xy, classes, strict=True):
        if not 0 <= c < n_classes:
            continue
        cx, cy = int(np.floor(x)), int(np.floor(y))
        xs, ys = cx + offs, cy + offs
        vx, vy = (xs >= 0) & (xs < w), (ys >= 0) & (ys < h)
        if not vx.any() or not vy.any():
            continue
        gx = np.exp(-((xs[vx] + 0.5 - x) ** 2) / (2 * sigma_px**2))
        gy = np.exp(-((ys[vy] + 0.5 - y) ** 2) / (2 * sigma_px**2))
        patch = np.outer(gy, gx).astype(np.float32)
        sub = heat[c, ys[vy][0] : ys[vy][-1] + 1, xs[vx][0] : xs[vx][-1] + 1]
        np.maximum(sub, patch, out=sub)
        if 0 <= cx < w and 0 <= cy < h:
            heat[c, cy, cx] = 1.0  # the focal loss's positive: the pixel holding the centre
    return heat


def disc_mask(points_xy: np.ndarray, radii_px: np.ndarray, *, shape: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W): 1 inside a disc of radius r_i around each point (nucleus proxy)."""
    h, w = shape
    mask = np.zeros((h, w), dtype=np.uint8)
    for (x, y), r in zip(points_xy, radii_px, strict=True):
        x0, x1 = max(int(x - r), 0), min(int(np.ceil(x + r)) + 1, w)
        y0, y1 = max(int(y - r), 0), min(int(np.ceil(y + r)) + 1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r * r
        mask[y0:y1, x0:x1] |= inside.astype(np.uint8)
    return mask


def weak_nucleus_mask(image: np.ndarray, points_xy: np.ndarray, *, radius_px: float) -> np.ndarray:
    """Weak lymphocyte-nucleus mask for point-only labels: haematoxylin-dark pixels within
    `radius_px` of each labelled centre (falls back to the disc where nothing is dark).

    `image`: uint8 RGB (H, W, 3). Returns uint8 (H, W) in {0, 1}.
    """
    disc = disc_mask(points_xy, np.full(len(points_xy), radius_px), shape=image.shape[:2])
    if not disc.any():
        return disc
    gray = image.astype(np.float32).mean(axis=2)
    dark = gray < np.percentile(gray[disc > 0], 60)
    weak = disc & dark.astype(np.uint8)
    return weak if weak.sum() >= 0.3 * disc.sum() else disc
