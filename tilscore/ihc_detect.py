"""Classical IHC positive-cell detection on the device (pure: tensors in, dataclasses out).

Per image of a uint8 NHWC batch (any device), at a working resolution (default 0.5 µm/px,
the pipeline's tile mpp; finer inputs are area-resampled to it, coarser ones are used as
they are), with all sizes in µm (:class:`IhcParams`):

1. colour deconvolution (:func:`tilscore.ihc.deconvolve`) into haematoxylin and DAB,
   against the slide's stain vectors and glass colour when given;
2. nucleus candidates: peaks of a centre-surround response of H + DAB (mean over a disc
   minus mean over a surrounding annulus, best over a few nucleus radii; for membranous
   markers plus half the ring's DAB), by round max-pool NMS, merged when closer than
   two distinct nuclei can be, and above a minimum contrast. DAB is part of the stain
   because a strongly DAB+ nucleus shows little haematoxylin (nuclear markers) and a
   brown ring fills in at cell scale (membranous markers);
3. per candidate, sampled at the peak only: the mean DAB over the marker compartment
   (a disc for FOXP3, an annulus around the nucleus for CD20) and the local DAB
   background (least-stained of 8 sectors of an annulus outside the cell);
4. ``positive``: compartment mean - background >= ``dab_threshold_od``; QuPath-style
   intensity bins of the same difference.

Output coordinates are in the *input's* pixels (pixel centres at +0.5, like
:func:`tilscore.infer.find_peaks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tilscore.errors import UsageError
from tilscore.ihc import deconvolve
from tilscore.score import DAB_BINS_OD

MARKERS = ("foxp3", "cd20")


@dataclass(frozen=True)
class IhcParams:
    """Detection constants of one marker (µm and OD units; see :func:`ihc_params`).

    Candidates. A nucleus is a peak of a centre-surround response of the stain
    ``H + nucleus_dab_weight * DAB``: for each radius r in ``nucleus_radii_um``, its mean
    over a disc of radius r minus its mean over the annulus r + ``surround_gap_um`` ..
    r + ``surround_gap_um + surround_width_um``; the best radius wins. Membranous markers
    add ``ring_weight`` x the ring's DAB mean (a matched filter of a nucleus inside a brown
    ring). Peaks must exceed ``min_signal_od`` and be the maximum of the response within
    ``nms_radius_um`` (round max-pool NMS); of two peaks closer than ``merge_radius_um``
    (two distinct lymphocyte nuclei are >= ~6 µm apart) the weaker one is dropped.

    Marker. ``compartment`` "nucleus": DAB mean over a disc of ``measure_radius_um``;
    "membrane": over the annulus ``ring_inner_um``..``ring_inner_um + ring_width_um``.
    The local DAB background is the least-stained of 8 sectors of the annulus
    ``background_um`` around the cell (diffuse DAB is in every direction; next to a real
    cell some direction is free of it). ``positive``: compartment mean - background >=
    ``dab_threshold_od``. ``bins_od``: weak/moderate/strong lower limits of that
    difference for positive cells (by default QuPath's 0.2/0.4/0.6 log10 OD, i.e.
    0.461/0.921/1.382 in tilscore's natural-log OD).
    ``working_mpp``: finer inputs are resampled to this µm/px before detection.
    """

    marker: str
    compartment: str
    nucleus_radii_um: tuple[float, ...]
    surround_gap_um: float
    surround_width_um: float
    min_signal_od: float
    nms_radius_um: float
    merge_radius_um: float
    measure_radius_um: float
    ring_inner_um: float
    ring_width_um: float
    background_um: tuple[float, float]
    dab_threshold_od: float
    ring_weight: float = 0.0
    nucleus_dab_weight: float = 1.0
    bins_od: tuple[float, float, float] = DAB_BINS_OD
    working_mpp: float = 0.5


# Defaults (validation: docs/ihc.md, scripts/validate_ihc.py). Lymphocyte nuclei are
# ~6-7 µm across: a 2.5 µm disc sits inside one; tumour nuclei reach ~11 µm, hence the
# 3.5/4.5 µm scales for the nuclear marker (FOXP3 is also seen in tumour cells). The B-cell
# membrane lies just outside the nucleus (scant cytoplasm): CD20 ring 3-4.5 µm, and the
# candidate surround starts beyond it (5 µm), or the ring would dent the response at the
# cell centre. Local DAB background just outside the cell (5-7 / 5.5-7.5 µm).
# Thresholds: nuclear DAB excess 1.2 OD (on the DeepLIIF Ki67 set strict F1 is 0.86-0.91
# from 0.8 to 2.2 OD; 1.2 is the low end of that plateau; docs/ihc.md); the ring mean
# dilutes a ~1 µm membrane over a 1.5 µm annulus, so the membranous threshold is 0.3.
# Both can be set per run in the score configuration (configs/score.yaml).
# min_signal_od 0.08: pale counterstained nuclei (Ki67 set) vs. collagen texture
# (synthetic stroma).
_DEFAULTS = {
    "foxp3": IhcParams(
        marker="foxp3", compartment="nucleus", nucleus_radii_um=(2.5, 3.5, 4.5),
        surround_gap_um=1.0, surround_width_um=2.0,
        min_signal_od=0.08, nms_radius_um=3.0, merge_radius_um=5.0, measure_radius_um=2.0,
        ring_inner_um=0.0, ring_width_um=0.0, background_um=(5.0, 7.0),
        dab_threshold_od=1.2),
    "cd20": IhcParams(
        marker="cd20", compartment="membrane", nucleus_radii_um=(2.5,),
        surround_gap_um=2.5, surround_width_um=2.0,
        min_signal_od=0.08, nms_radius_um=3.0, merge_radius_um=5.0, measure_radius_um=0.0,
        ring_inner_um=3.0, ring_width_um=1.5, background_um=(5.5, 7.5),
        dab_threshold_od=0.3, ring_weight=0.5),
}


def ihc_params(marker: str, **overrides) -> IhcParams:
    """Default :class:`IhcParams` of ``marker`` ("foxp3" or "cd20"), with overrides."""
    if marker not in _DEFAULTS:
        raise UsageError(f"unknown IHC marker {marker!r}; valid: {list(MARKERS)}")
    params = replace(_DEFAULTS[marker], **overrides)
    if params.compartment not in ("nucleus", "membrane"):
        raise UsageError(f"unknown compartment {params.compartment!r}; valid: nucleus, membrane")
    return params


@dataclass(frozen=True)
class CellsOnTile:
    """Cells detected in one image; 1-D tensors of length n on the input's device.

    ``x_px``, ``y_px``: float32 centres in the input image's pixels (pixel centre = +0.5).
    ``dab_od``: float32 mean DAB concentration (OD) in the marker compartment;
    ``dab_background_od``: float32 local DAB background (least-stained sector around it).
    ``positive``: bool, ``dab_od - dab_background_od >= dab_threshold_od``. ``score``:
    float32 candidate response (nucleus contrast, OD). ``intensity_bin``: int8 0 for a
    negative cell; a positive one is 1 weak, 2 moderate or 3 strong by its DAB excess
    against ``bins_od`` (at least 1), so the H-score agrees with the positive call.
    OD throughout is natural-log, ``ln(I0 / I)`` (QuPath's log10 OD × ln 10).
    """

    x_px: torch.Tensor
    y_px: torch.Tensor
    dab_od: torch.Tensor
    dab_background_od: torch.Tensor
    positive: torch.Tensor
    score: torch.Tensor
    intensity_bin: torch.Tensor

    def __len__(self) -> int:
        return int(self.x_px.numel())


def annulus_kernel(r_in_px: float, r_out_px: float, device=None, sub: int = 8) -> torch.Tensor:
    """float32 (k, k) anti-aliased annulus r_in <= r < r_out (a disc when r_in = 0),
    normalised to sum 1: each pixel's weight is its covered area (sub x sub samples)."""
    R = int(math.ceil(r_out_px))
    off = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub - 0.5
    t = torch.arange(-R, R + 1, dtype=torch.float64)
    pos = (t[:, None] + off[None, :]).reshape(-1)  # sub-sample coordinates
    r = torch.hypot(pos[:, None], pos[None, :])
    inside = ((r < r_out_px) & (r >= r_in_px)).double()
    k = inside.view(2 * R + 1, sub, 2 * R + 1, sub).mean(dim=(1, 3))
    if k.sum() <= 0:  # a ring thinner than the sampling: fall back to the centre pixel
        k[R, R] = 1.0
    return (k / k.sum()).float().to(device)


def _region_mean(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Weighted mean of (N, 1, H, W) over `kernel` ((k, k), or (m, k, k) for m output
    channels at once) centred at every pixel (reflect padding)."""
    kernels = kernel[None, None] if kernel.ndim == 2 else kernel[:, None]
    r = kernels.shape[-1] // 2
    r_pad = min(r, x.shape[-1] - 1, x.shape[-2] - 1)
    x = F.pad(x, (r_pad,) * 4, mode="reflect")
    if r_pad < r:  # tiny images: zero-pad the rest
        x = F.pad(x, (r - r_pad,) * 4)
    return F.conv2d(x, kernels)


def _centre_surround_kernels(params: IhcParams, wmpp: float, device) -> torch.Tensor:
    """float32 (m, k, k): per nucleus radius r, the disc-r mean minus the mean over the
    annulus r + gap .. r + gap + width, as one kernel (zero-padded to a common size), so
    one convolution gives every scale's centre-surround response."""
    kernels = []
    for r_um in params.nucleus_radii_um:
        r0 = (r_um + params.surround_gap_um) / wmpp
        disc = annulus_kernel(0.0, r_um / wmpp, device)
        ring = annulus_kernel(r0, r0 + params.surround_width_um / wmpp, device)
        p = (ring.shape[-1] - disc.shape[-1]) // 2
        kernels.append(F.pad(disc, (p, p, p, p)) - ring)
    k = max(t.shape[-1] for t in kernels)
    return torch.stack([F.pad(t, ((k - t.shape[-1]) // 2,) * 4) for t in kernels])


def disc_max(x: torch.Tensor, radius_px: float) -> torch.Tensor:
    """Grey dilation of (N, C, H, W) by a disc of `radius_px` (max over the disc; outside
    the image counts as -inf): one horizontal max-pool per disc row, shifted and merged."""
    r = int(math.floor(radius_px))
    out = x.clone()
    h = x.shape[-2]
    for dy in range(-r, r + 1):
        w = int(math.floor(math.sqrt(max(radius_px**2 - dy * dy, 0.0))))
        row = F.max_pool2d(x, (1, 2 * w + 1), stride=1, padding=(0, w)) if w else x
        if dy == 0:
            out = torch.maximum(out, row)
        elif abs(dy) < h:  # out[y] = max(out[y], row[y + dy])
            if dy > 0:
                out[..., : h - dy, :] = torch.maximum(out[..., : h - dy, :], row[..., dy:, :])
            else:
                out[..., -dy:, :] = torch.maximum(out[..., -dy:, :], row[..., : h + dy, :])
    return out


def find_cell_peaks(response: torch.Tensor, nms_radius_px: float, merge_radius_px: float,
                    threshold: float) -> torch.Tensor:
    """Cell centres: maxima of (N, 1, H, W) `response` above `threshold`, in two stages.

    1. max-pool NMS with a round footprint: a pixel is kept when it is the maximum of the
       response within `nms_radius_px` (weak maxima on a stronger cell's flank go);
    2. of two such peaks closer than `merge_radius_px`, only the stronger is kept: a peak
       goes when a stronger peak of the same image lies within the radius (compared
       pairwise among the peaks, which are few).

    Ties (plateaus) are broken as in :func:`tilscore.infer.find_peaks` by a tiny ramp
    linear in position. Returns float32 (n, 4) rows (batch index, x_px, y_px, response),
    pixel centres at +0.5.
    """
    h, w = response.shape[-2:]
    ramp = torch.arange(h * w, device=response.device, dtype=torch.float64).view(h, w)
    ranked = response.double() + ramp * (1e-6 / (h * w))
    keep = (ranked == disc_max(ranked, nms_radius_px)) & (response > threshold)
    b, _, y, x = keep.nonzero(as_tuple=True)
    if merge_radius_px > nms_radius_px and len(b) > 1:
        rank = ranked[b, 0, y, x]
        d2 = (x[:, None] - x[None, :]).double() ** 2 + (y[:, None] - y[None, :]).double() ** 2
        beaten = ((b[:, None] == b[None, :]) & (d2 <= merge_radius_px**2)
                  & (rank[None, :] > rank[:, None])).any(dim=1)
        b, y, x = b[~beaten], y[~beaten], x[~beaten]
    return torch.stack([b.float(), x.float() + 0.5, y.float() + 0.5,
                        response[b, 0, y, x].float()], 1)


def sector_kernels(r_in_px: float, r_out_px: float, n: int = 8, device=None,
                   sub: int = 8) -> torch.Tensor:
    """float32 (n, k, k) kernels: the annulus r_in <= r < r_out cut into `n` equal angular
    sectors, each anti-aliased (covered area from sub x sub samples) and summing to 1."""
    R = max(1, int(math.ceil(r_out_px)))
    off = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub - 0.5
    pos = (torch.arange(-R, R + 1, dtype=torch.float64)[:, None] + off[None, :]).reshape(-1)
    yy, xx = pos[:, None], pos[None, :]
    r = torch.hypot(yy, xx)
    sector = torch.floor((torch.atan2(yy, xx) % (2 * math.pi)) / (2 * math.pi / n)).clamp(max=n - 1)
    ring = (r >= r_in_px) & (r < r_out_px)
    ks = []
    for i in range(n):
        k = (ring & (sector == i)).double().view(2 * R + 1, sub, 2 * R + 1, sub).mean(dim=(1, 3))
        ks.append(k / k.sum().clamp_min(1e-12))
    return torch.stack(ks).float().to(device)


def _patches(x: torch.Tensor, b: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor,
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


def _weighted(patches: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """(n, k, k) patches x (m, k', k') centred kernels (k' <= k) -> (n, m) weighted sums."""
    c = (patches.shape[-1] - kernels.shape[-1]) // 2
    inner = patches[:, c:patches.shape[-1] - c, c:patches.shape[-1] - c]
    return torch.einsum("nij,mij->nm", inner, kernels)


def _resample(rgb_uint8_nhwc: torch.Tensor, mpp: float, working_mpp: float):
    """(float (N, H', W', 3) RGB at ~working mpp, (sy, sx) input px per working px)."""
    n, h, w, _ = rgb_uint8_nhwc.shape
    if mpp >= 0.95 * working_mpp:
        return rgb_uint8_nhwc.float(), (1.0, 1.0)
    hw = max(1, round(h * mpp / working_mpp)), max(1, round(w * mpp / working_mpp))
    x = rgb_uint8_nhwc.float().permute(0, 3, 1, 2)
    # Area-like averaging (as a slide read at the working mpp would give).
    x = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1), (h / hw[0], w / hw[1])


def detect_cells(rgb_uint8_nhwc: torch.Tensor, mpp: float, marker: str,
                 params: IhcParams | None = None, stain_matrix=None) -> list[CellsOnTile]:
    """Detect nuclei and score them for the marker (see the module docstring).

    rgb_uint8_nhwc: uint8 (N, H, W, 3) on any device. mpp: µm per input pixel.
    marker: "foxp3" or "cd20"; params: None = :func:`ihc_params` defaults of the marker.
    stain_matrix: (3, 3) rows H, DAB, residual, a :class:`~tilscore.ihc.StainVectors`, or
    None (Ruifrok defaults). Returns one :class:`CellsOnTile` per image.
    """
    params = params or ihc_params(marker)
    if params.marker != marker:
        raise UsageError(f"IhcParams are for {params.marker!r}, not {marker!r}")
    if rgb_uint8_nhwc.ndim != 4 or rgb_uint8_nhwc.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB, got {tuple(rgb_uint8_nhwc.shape)}")
    rgb, (sy, sx) = _resample(rgb_uint8_nhwc, float(mpp), params.working_mpp)
    wmpp = float(mpp) * math.sqrt(sy * sx)  # µm per working pixel
    conc = deconvolve(rgb, stain_matrix)
    hx, dab = conc[:, 0:1].clamp_min(0.0), conc[:, 1:2].clamp_min(0.0)
    dev = dab.device
    if params.compartment == "nucleus":
        compartment = annulus_kernel(0.0, params.measure_radius_um / wmpp, dev)
    else:
        r_in = params.ring_inner_um / wmpp
        compartment = annulus_kernel(r_in, r_in + params.ring_width_um / wmpp, dev)

    # Candidates: peaks of a centre-surround response of the nucleus stain (+ the brown
    # ring for membranous markers), the best over the nucleus radii (scale space: a large
    # nucleus peaks once at its centre at its own scale, not along its rim at a small one).
    stain = hx + params.nucleus_dab_weight * dab
    response = _region_mean(stain, _centre_surround_kernels(params, wmpp, dev)).amax(
        dim=1, keepdim=True)
    if params.ring_weight:
        response = response + params.ring_weight * _region_mean(dab, compartment)
    peaks = find_cell_peaks(response, params.nms_radius_um / wmpp,
                            params.merge_radius_um / wmpp, params.min_signal_od)
    b = peaks[:, 0].long()
    xw, yw = peaks[:, 1], peaks[:, 2]

    # Marker: DAB in the compartment against the local background, sampled at the peaks.
    sectors = sector_kernels(params.background_um[0] / wmpp, params.background_um[1] / wmpp,
                             8, dev)
    radius = max(sectors.shape[-1], compartment.shape[-1]) // 2
    patches = _patches(dab, b, yw.long(), xw.long(), radius)
    dab_od = _weighted(patches, compartment[None])[:, 0]
    background = _weighted(patches, sectors).amin(dim=1)
    excess = dab_od - background
    positive = excess >= params.dab_threshold_od
    bins = torch.tensor(params.bins_od, device=dev, dtype=excess.dtype)
    # As QuPath's positive % and H-score agree: a negative cell is bin 0, a positive cell
    # at least "weak" (1), whatever the bin limits are against the threshold.
    graded = torch.bucketize(excess, bins, right=True).clamp_min(1)
    intensity = torch.where(positive, graded, torch.zeros_like(graded)).to(torch.int8)
    out = []
    for i in range(rgb.shape[0]):
        sel = b == i
        out.append(CellsOnTile(x_px=(xw[sel] * sx).float(), y_px=(yw[sel] * sy).float(),
                               dab_od=dab_od[sel].float(),
                               dab_background_od=background[sel].float(),
                               positive=positive[sel], score=peaks[sel, 3],
                               intensity_bin=intensity[sel]))
    return out
