"""Per-nucleus segmentation and shape on the device (pure: tensors in, tensors out).

Each candidate nucleus of :mod:`tilscore.ihc_detect` is segmented in a small window around
it: the nuclear stain above half-way between the nucleus core and the window's
background, the connected piece that holds the centre, and (so that touching nuclei are
measured one by one) only the pixels nearer to this candidate than to any other. Its
area, equivalent diameter and the axes of its moment ellipse say whether it is
lymphocyte-like (:func:`tilscore.ihc_detect.lymphocyte_gate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NucleusShape:
    """Shape of each segmented nucleus; 1-D tensors of length n.

    ``area_um2``: segmented area; ``diameter_um``: equivalent diameter 2 sqrt(area / pi);
    ``major_um``, ``minor_um``: full axes of the ellipse with the same second moments;
    ``contrast_od``: nuclear stain of the core minus the window's background (OD);
    ``touches_window``: the segment reaches the window's edge (the nucleus is at least
    that large); ``mask``: bool (n, k, k) the segments (k = 2 window + 1);
    ``centroid_dx_px``, ``centroid_dy_px``: the segment's centroid relative to the
    candidate's pixel (window px; 0 for an empty segment).
    ``cut_by_edge``: bool, the segment reaches the edge of the image's real part (None:
    not known): the nucleus may go on beyond it, so its visible part's shape is not its
    own.
    """

    area_um2: torch.Tensor
    diameter_um: torch.Tensor
    major_um: torch.Tensor
    minor_um: torch.Tensor
    contrast_od: torch.Tensor
    touches_window: torch.Tensor
    mask: torch.Tensor
    centroid_dx_px: torch.Tensor | None = None
    centroid_dy_px: torch.Tensor | None = None
    cut_by_edge: torch.Tensor | None = None

    @property
    def axis_ratio(self) -> torch.Tensor:
        """minor / major axis (1 = round)."""
        return self.minor_um / self.major_um.clamp_min(1e-6)


def patches(x: torch.Tensor, *, b: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor,
            radius_px: int) -> torch.Tensor:
    """(n, k, k) windows (k = 2 radius + 1) of (N, 1, H, W) centred on pixels (b, iy, ix),
    reflect-padded at image edges (zero beyond a reflection)."""
    r = int(radius_px)
    h, w = x.shape[-2:]
    r_pad = min(r, h - 1, w - 1)
    xp = F.pad(x, (r_pad,) * 4, mode="reflect") if r_pad > 0 else x
    if r_pad < r:
        xp = F.pad(xp, (r - r_pad,) * 4)
    t = torch.arange(2 * r + 1, device=x.device)
    return xp[b[:, None, None], 0, iy[:, None, None] + t[None, :, None],
              ix[:, None, None] + t[None, None, :]]


def nearer_than_neighbours(b: torch.Tensor, *, x: torch.Tensor, y: torch.Tensor,
                           radius_px: int, k_neighbours: int = 8) -> torch.Tensor:
    """bool (n, k, k): window pixels (centred on integer pixel (x, y) of image b) nearer to
    their own candidate than to any of its `k_neighbours` nearest others (a Voronoi cell)."""
    n = len(b)
    k = 2 * radius_px + 1
    out = torch.ones((n, k, k), dtype=torch.bool, device=b.device)
    if n < 2:
        return out
    t = torch.arange(-radius_px, radius_px + 1, device=b.device, dtype=torch.float32)
    dy, dx = t[:, None], t[None, :]
    xf, yf = x.float(), y.float()
    far = float((4 * radius_px) ** 2)
    # pairwise distances per image (few thousand cells at most per tile)
    for img in torch.unique(b).tolist():
        idx = torch.nonzero(b == img).flatten()
        if len(idx) < 2:
            continue
        px, py = xf[idx], yf[idx]
        d2 = (px[:, None] - px[None, :]) ** 2 + (py[:, None] - py[None, :]) ** 2
        d2.fill_diagonal_(float("inf"))
        m = min(k_neighbours, len(idx) - 1)
        nd2, nj = torch.topk(d2, m, dim=1, largest=False)
        ox = (px[nj] - px[:, None])  # (c, m) neighbour offsets
        oy = (py[nj] - py[:, None])
        near = nd2 < far
        # pixel p is nearer to the neighbour when |p - o|^2 < |p|^2, i.e. 2 p.o > |o|^2
        dot = 2 * (dx[None, None] * ox[:, :, None, None] + dy[None, None] * oy[:, :, None, None])
        beaten = (dot > (ox * ox + oy * oy)[:, :, None, None]) & near[:, :, None, None]
        out[idx] = ~beaten.any(dim=1)
    return out


def segment_nuclei(stain: torch.Tensor, *, b: torch.Tensor, iy: torch.Tensor,
                   ix: torch.Tensor, window_px: int, core_px: float, level: float = 0.5,
                   separate: bool = True, background_quantile: float = 0.1,
                   flood: bool = False, bounds: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment each candidate's nucleus in its window.

    stain: float (N, 1, H, W) nuclear stain (OD); (b, iy, ix): long (n,) candidate pixels;
    window_px: window radius (reflect-padded at the image's edges); core_px: radius of the
    core disc whose mean is the nucleus level; level: the threshold's place between the
    background (the window's `background_quantile`) and the core; separate: keep only
    pixels nearer to this candidate than to the others; flood: keep the pixels connected
    to the centre (8-connected flood fill), else those whose straight line to the centre
    stays above the threshold (star-shaped, as nuclei are; one gather, much faster: for
    every candidate); bounds: None, or float (n, 4) (x0, y0, x1, y1), end exclusive, in
    `stain` pixels: the real part of each candidate's image, outside which no pixel joins
    its segment (a nucleus at the edge would otherwise take in its own mirror image from
    the reflect padding, or from a mirrored margin, and read up to twice its size: the
    edge is the bisector between a cell and its mirror image, as the Voronoi split draws
    between two cells). Returns (bool (n, k, k) segments,
    k = 2 window + 1; float (n,) core minus background, OD).
    """
    win = patches(stain, b=b, iy=iy, ix=ix, radius_px=window_px)
    k = 2 * window_px + 1
    t = torch.arange(-window_px, window_px + 1, device=stain.device, dtype=torch.float32)
    core = (t[:, None] ** 2 + t[None, :] ** 2 <= max(core_px, 0.5) ** 2).float()
    core_mean = (win * core).flatten(1).sum(1) / core.sum()
    rank = max(1, int(k * k * background_quantile))
    background = torch.kthvalue(win.flatten(1), rank, dim=1).values
    threshold = background + level * (core_mean - background)
    mask = win >= threshold[:, None, None]
    if separate:
        mask &= nearer_than_neighbours(b, x=ix, y=iy, radius_px=window_px)
    if bounds is not None:
        bx = ix[:, None].float() + t[None]  # (n, k) window pixel columns, rows
        by = iy[:, None].float() + t[None]
        bnd = bounds.to(stain.device).float()
        in_x = (bx >= bnd[:, 0:1]) & (bx < bnd[:, 2:3])
        in_y = (by >= bnd[:, 1:2]) & (by < bnd[:, 3:4])
        mask &= in_y[:, :, None] & in_x[:, None, :]
    if flood:  # geodesic dilation from the centre pixel
        m = mask[:, None].to(win.dtype)
        seed = torch.zeros_like(m)
        seed[:, 0, window_px, window_px] = 1.0
        seed = seed * m
        for _ in range(2 * window_px):
            grown = F.max_pool2d(seed, 3, stride=1, padding=1) * m
            if torch.equal(grown, seed):
                break
            seed = grown
        return seed[:, 0] > 0, core_mean - background
    # the piece seen from the centre: pixels whose straight line to the centre stays in
    # the mask
    rays = _ray_index(window_px, stain.device)
    seen = mask.flatten(1)[:, rays].all(dim=-1).view(-1, k, k)
    return seen, core_mean - background


_RAYS: dict = {}


def _ray_index(window_px: int, device) -> torch.Tensor:
    """long (k*k, m): for each pixel of a (k, k) window (k = 2 window + 1), the flat
    indices of m points on the straight line from it to the centre (itself included)."""
    key = (window_px, str(device))
    if key not in _RAYS:
        k = 2 * window_px + 1
        t = torch.arange(-window_px, window_px + 1, dtype=torch.float64)
        yy, xx = torch.meshgrid(t, t, indexing="ij")
        m = window_px + 1
        f = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
        py = (yy.reshape(-1, 1) * f).round().long() + window_px
        px = (xx.reshape(-1, 1) * f).round().long() + window_px
        _RAYS[key] = (py * k + px).to(device)
    return _RAYS[key]


def nucleus_shape(masks: torch.Tensor, mpp: float, *, contrast: torch.Tensor) -> NucleusShape:
    """Area, equivalent diameter and moment-ellipse axes of bool (n, k, k) segments at
    `mpp` µm/px; `contrast`: float (n,) carried along."""
    n, k, _ = masks.shape
    r = k // 2
    t = torch.arange(-r, r + 1, device=masks.device, dtype=torch.float32)
    yy, xx = t[:, None].expand(k, k), t[None, :].expand(k, k)
    m = masks.float()
    area = m.flatten(1).sum(1)
    a = area.clamp_min(1.0)
    cx, cy = (m * xx).flatten(1).sum(1) / a, (m * yy).flatten(1).sum(1) / a
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    # pixel = unit square: + 1/12 per axis
    sxx = (m * dx * dx).flatten(1).sum(1) / a + 1 / 12
    syy = (m * dy * dy).flatten(1).sum(1) / a + 1 / 12
    sxy = (m * dx * dy).flatten(1).sum(1) / a
    half_tr, det_root = (sxx + syy) / 2, torch.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    l1, l2 = half_tr + det_root, (half_tr - det_root).clamp_min(1e-6)
    edge = torch.zeros((k, k), dtype=torch.bool, device=masks.device)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    touches = (masks & edge).flatten(1).any(1)
    area_um2 = area * mpp * mpp
    return NucleusShape(area_um2=area_um2, diameter_um=2 * torch.sqrt(area_um2 / math.pi),
                        major_um=4 * torch.sqrt(l1) * mpp, minor_um=4 * torch.sqrt(l2) * mpp,
                        contrast_od=contrast, touches_window=touches, mask=masks,
                        centroid_dx_px=cx, centroid_dy_px=cy)


def merge_without_saddle(smooth: torch.Tensor, peaks: torch.Tensor, *, radius_px: float,
                         saddle_fraction: float, n_samples: int = 9) -> torch.Tensor:
    """Drop the weaker of two peaks that lie on one nucleus.

    smooth: float (N, 1, H, W) smoothed nuclear stain; peaks: float (n, 4) rows (image,
    x_px, y_px, response) with pixel centres at +0.5 (:func:`find_cell_peaks`). Two peaks
    of an image closer than `radius_px` are one nucleus when the stain along the segment
    between them never falls below `saddle_fraction` x the lower of their two stain
    values (no dip, as between two touching nuclei); the one with the lower response
    goes. Returns bool (n,) kept.
    """
    n = len(peaks)
    keep = torch.ones(n, dtype=torch.bool, device=peaks.device)
    if n < 2:
        return keep
    b, x, y, resp = peaks[:, 0].long(), peaks[:, 1] - 0.5, peaks[:, 2] - 0.5, peaks[:, 3]
    h, w = smooth.shape[-2:]
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    close = (b[:, None] == b[None, :]) & (d2 <= radius_px**2) & (d2 > 0)
    i, j = torch.nonzero(torch.triu(close, diagonal=1), as_tuple=True)
    if len(i) == 0:
        return keep
    s = torch.linspace(0.0, 1.0, n_samples, device=peaks.device)
    sx = (x[i, None] + s[None] * (x[j] - x[i])[:, None]).round().long().clamp(0, w - 1)
    sy = (y[i, None] + s[None] * (y[j] - y[i])[:, None]).round().long().clamp(0, h - 1)
    line = smooth[b[i, None], 0, sy, sx]  # (pairs, samples)
    ends = torch.minimum(line[:, 0], line[:, -1])
    same = line.amin(dim=1) >= saddle_fraction * ends
    # the weaker of each same-nucleus pair goes (ties: the later one), strongest first
    order = torch.argsort(resp, descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=peaks.device)
    i, j = i[same], j[same]
    weak = torch.where(rank[i] > rank[j], i, j)
    strong = torch.where(rank[i] > rank[j], j, i)
    # resolve chains greedily in rank order on the host (pairs are few)
    pairs = sorted(zip(rank[strong].tolist(), strong.tolist(), weak.tolist(), strict=True))
    gone = set()
    for _, st, wk in pairs:
        if st not in gone:
            gone.add(wk)
    if gone:
        keep[torch.tensor(sorted(gone), device=peaks.device)] = False
    return keep


def lymphocyte_gate(response: torch.Tensor, shape: NucleusShape, *, params,
                    extra_diameter_um: float = 0.0) -> torch.Tensor:
    """int8 (n,) gate codes (:data:`tilscore.ihc_detect.GATES`) of nuclei with candidate
    `response` (float (n,), OD) and `shape`, against :class:`~tilscore.ihc_detect.
    NucleusParams` `params`: 0 passed; 1 ``faint_nucleus`` (response below
    ``min_contrast_od``: not a dark lymphocyte nucleus); 2 ``nucleus_size`` (equivalent
    diameter outside ``min_diameter_um``..``max_diameter_um`` + `extra_diameter_um` (a
    stained membrane taken into the segment), or larger than the window); 3 ``shape``
    (axis ratio below ``min_axis_ratio``; not judged for a nucleus cut by the image's
    edge, ``shape.cut_by_edge``). The first reason that applies, in that order."""
    code = torch.zeros(len(response), dtype=torch.int8, device=response.device)
    bad_shape = shape.axis_ratio < params.min_axis_ratio
    bad_size = ((shape.diameter_um < params.min_diameter_um)
                | (shape.diameter_um > params.max_diameter_um + extra_diameter_um)
                | shape.touches_window)
    if shape.cut_by_edge is not None:
        # a nucleus cut by the image's edge: the axis ratio of its visible part measures
        # the cut, not the nucleus (half a round nucleus reads 0.5, a sliver less), so
        # its shape is not judged; its size still is (a visible part too large for a
        # lymphocyte is too large)
        bad_shape &= ~shape.cut_by_edge
    faint = response < params.min_contrast_od
    for reason, bad in ((3, bad_shape), (2, bad_size), (1, faint)):
        code = torch.where(bad, torch.full_like(code, reason), code)
    return code
