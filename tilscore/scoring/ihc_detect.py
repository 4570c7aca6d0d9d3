"""Classical IHC cell detection on the device (pure: tensors in, dataclasses out).

Per image of a uint8 NHWC batch (any device), at a working resolution (default 0.5 µm/px,
the pipeline's tile mpp; finer inputs are area-resampled to it, coarser ones are used as
they are), with all sizes in µm:

1. colour deconvolution (:func:`tilscore.ihc.deconvolve`) into haematoxylin (H) and DAB,
   against the slide's stain vectors and glass colour when given; outside a ``valid`` box
   (the image's own extent inside a padded tile) the image is mirrored, so a cell at the
   edge is measured on the same kind of context as one inside;
2. **nuclei, the same for every marker** (:class:`NucleusParams`): peaks of a
   centre-surround response of ``H + dab_weight x DAB`` (best over a few nucleus radii),
   round max-pool NMS, and of two close peaks the weaker one when no dip in the stain
   separates them (one nucleus, not two touching ones); each is segmented in a small
   window (:mod:`tilscore.ihc_nuclei`) for its size and shape;
3. **the lymphocyte gate**: only a dark, lymphocyte-sized, roundish nucleus can be
   positive (:func:`tilscore.ihc_nuclei.lymphocyte_gate`);
4. **the marker where it lives** (:class:`IhcParams`): per cell the mean DAB over the
   nucleus (a disc), the membrane (an annulus around a lymphocyte nucleus), just outside
   the segmented nucleus, and the local background (least-stained of 8 sectors of an
   annulus outside the cell). FOXP3 is positive when the nucleus's DAB excess over the
   background reaches the threshold and the DAB just outside it is at most a fraction of
   that excess (brown cytoplasm or membranes next to a blue nucleus are not FOXP3); CD20
   when the membrane's excess reaches the threshold and the DAB just outside the cell is
   at most a fraction of it (not DAB across a large cell);
5. QuPath-style intensity bins of the marker's DAB excess for positive cells.

Every cell gets a ``gate`` code (:data:`GATES`): what stopped it from being positive other
than its DAB, or "passed". Output coordinates are in the *input's* pixels (pixel centres
at +0.5, like :func:`tilscore.infer.find_peaks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from tilscore.errors import UsageError
from tilscore.scoring.ihc import deconvolve
from tilscore.scoring.ihc_nuclei import (
    lymphocyte_gate,
    merge_without_saddle,
    nucleus_shape,
    patches,
    segment_nuclei,
)
from tilscore.scoring.score import DAB_BINS_OD

MARKERS = ("foxp3", "cd20")
# Why a cell is not positive besides its DAB (cells.csv ``gate``); index = code.
GATES = ("passed", "faint_nucleus", "nucleus_size", "shape", "marker_location")


@dataclass(frozen=True)
class NucleusParams:
    """Nucleus detection and the lymphocyte gate, shared by every marker (µm, OD).

    Candidates: for each radius r in ``radii_um``, the mean of ``H + dab_weight x DAB``
    over a disc of radius r minus its mean over the annulus r + ``surround_gap_um`` ..
    r + ``surround_gap_um + surround_width_um``; the best radius wins. Peaks must exceed
    ``min_signal_od`` and be the maximum within ``nms_radius_um``. Of two peaks closer
    than ``merge_radius_um`` the weaker goes unless the stain (smoothed over a disc of
    ``smooth_um``) dips below ``saddle_fraction`` x the lower of the two between them.

    Segmentation (:func:`tilscore.ihc_nuclei.segment_nuclei`): in a window of radius
    ``window_um``, the stain above ``level`` of the way from the window's background
    (10th percentile) to the mean over the central ``core_um`` disc, connected to the
    centre, nearer to this nucleus than to any other.

    Gate (``lymphocyte_gate``; off only to validate with markers of other cells, e.g.
    Ki67): the candidate's response (nucleus contrast) at least ``min_contrast_od``
    (``faint_nucleus``); equivalent diameter within ``min_diameter_um`` ..
    ``max_diameter_um`` and the segment inside the window (``nucleus_size``); minor /
    major axis at least ``min_axis_ratio`` (``shape``).
    ``working_mpp``: finer inputs are resampled to this µm/px before detection.
    """

    radii_um: tuple[float, ...] = (2.0, 3.0, 4.5, 6.5)
    surround_gap_um: float = 1.0
    surround_width_um: float = 2.0
    dab_weight: float = 0.5
    segment_dab_weight: float = 0.5
    min_signal_od: float = 0.08
    nms_radius_um: float = 2.0
    merge_radius_um: float = 4.0
    saddle_fraction: float = 0.85
    smooth_um: float = 1.0
    window_um: float = 8.0
    core_um: float = 1.5
    level: float = 0.5
    lymphocyte_gate: bool = True
    min_contrast_od: float = 0.4
    min_diameter_um: float = 3.0
    max_diameter_um: float = 10.0
    min_axis_ratio: float = 0.45
    working_mpp: float = 0.5


@dataclass(frozen=True)
class IhcParams:
    """Marker constants (µm and OD units; see :func:`ihc_params`).

    ``compartment`` "nucleus" (FOXP3) or "membrane" (CD20): where the marker's DAB is read.
    Per cell: the nucleus DAB is the mean over a disc of ``nucleus_radius_um``; the
    membrane DAB over the annulus ``membrane_um`` (just outside a lymphocyte nucleus); the
    local background is the least-stained of 8 sectors of the annulus ``background_um``.
    ``positive``: the compartment's DAB minus the background >= ``dab_threshold_od``, the
    cell passed the lymphocyte gate, and the DAB is where the marker lives
    (``marker_location``). Nuclear marker: the DAB blob is a nucleus, closed within
    ``blob_window_um`` of the centre (the DAB above half-way from the window's background
    to the centre's, connected to the centre, does not reach the window's edge; a brown
    membrane or cytoplasm network does). Membranous marker: a haematoxylin nucleus inside
    the ring (over the central ``core_um`` disc, H / (H + DAB) at least
    ``min_haematoxylin_fraction``; a brown blob with no blue centre is not a membrane
    around a nucleus).
    ``stained_rim_um``: a membranous marker stains the cell's rim, which the nucleus
    segment (on H + DAB) then takes in: the gate's largest diameter grows by twice this.
    ``bins_od``: weak/moderate/strong lower limits of the excess for positive cells (by
    default QuPath's 0.2/0.4/0.6 log10 OD, i.e. 0.461/0.921/1.382 natural-log OD).
    ``nuclei``: the shared :class:`NucleusParams`.
    """

    marker: str
    compartment: str
    dab_threshold_od: float
    nucleus_radius_um: float = 2.0
    membrane_um: tuple[float, float] = (3.0, 4.5)
    background_um: tuple[float, float] = (5.5, 7.5)
    blob_window_um: float = 12.0
    core_um: float = 1.5
    min_haematoxylin_fraction: float = 0.25
    stained_rim_um: float = 0.0
    bins_od: tuple[float, float, float] = DAB_BINS_OD
    nuclei: NucleusParams = field(default_factory=NucleusParams)


# Marker defaults (validation: docs/ihc.md, scripts/validate_ihc.py). Thresholds: nuclear
# DAB excess 1.2 OD (on the DeepLIIF Ki67 set strict F1 is flat from 0.8 to 2.2 OD; 1.2 is
# the low end of that plateau); the membrane annulus mean dilutes a ~1 µm membrane over
# 1.5 µm, so the membranous threshold is 0.3. Both can be set in configs/score.yaml.
_DEFAULTS = {
    "foxp3": IhcParams(marker="foxp3", compartment="nucleus", dab_threshold_od=1.2),
    "cd20": IhcParams(marker="cd20", compartment="membrane", dab_threshold_od=0.3,
                      stained_rim_um=1.5),
}
_NUCLEUS_FIELDS = {f for f in NucleusParams.__dataclass_fields__}


def ihc_params(marker: str, **overrides) -> IhcParams:
    """Default :class:`IhcParams` of ``marker`` ("foxp3" or "cd20"), with overrides; keys
    of :class:`NucleusParams` override its ``nuclei``."""
    if marker not in _DEFAULTS:
        raise UsageError(f"unknown IHC marker {marker!r}; valid: {list(MARKERS)}")
    nucleus = {k: overrides.pop(k) for k in list(overrides) if k in _NUCLEUS_FIELDS}
    params = replace(_DEFAULTS[marker], **overrides)
    if nucleus:
        params = replace(params, nuclei=replace(params.nuclei, **nucleus))
    if params.compartment not in ("nucleus", "membrane"):
        raise UsageError(f"unknown compartment {params.compartment!r}; valid: nucleus, membrane")
    return params


@dataclass(frozen=True)
class CellsOnTile:
    """Cells detected in one image; 1-D tensors of length n on the input's device.

    ``x_px``, ``y_px``: float32 centres in the input image's pixels (pixel centre = +0.5).
    ``dab_od``: float32 mean DAB (OD) in the marker compartment (``dab_nucleus_od`` for
    FOXP3, ``dab_membrane_od`` for CD20); ``dab_background_od``: float32 local DAB
    background (least-stained sector around the cell); ``haematoxylin_fraction``: H / (H +
    DAB) over the nucleus's core. ``nucleus_area_um2``, ``nucleus_axis_ratio``: the segment's
    area and minor/major axis ratio. ``gate``: int8 index into :data:`GATES`.
    ``positive``: bool, gate "passed" and ``dab_od - dab_background_od >=
    dab_threshold_od``. ``score``: float32 candidate response (nucleus contrast, OD).
    ``intensity_bin``: int8 0 for a negative cell; a positive one is 1 weak, 2 moderate
    or 3 strong by its DAB excess against ``bins_od`` (at least 1), so the H-score agrees
    with the positive call. OD throughout is natural-log, ``ln(I0 / I)`` (QuPath's log10
    OD × ln 10).
    """

    x_px: torch.Tensor
    y_px: torch.Tensor
    dab_od: torch.Tensor
    dab_background_od: torch.Tensor
    positive: torch.Tensor
    score: torch.Tensor
    intensity_bin: torch.Tensor
    dab_nucleus_od: torch.Tensor
    dab_membrane_od: torch.Tensor
    haematoxylin_fraction: torch.Tensor
    nucleus_area_um2: torch.Tensor
    nucleus_axis_ratio: torch.Tensor
    gate: torch.Tensor

    def __len__(self) -> int:
        return int(self.x_px.numel())


def annulus_kernel(r_in_px: float, r_out_px: float, *, device=None, sub: int = 8) -> torch.Tensor:
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


def _centre_surround_kernels(params: NucleusParams, wmpp: float, device) -> torch.Tensor:
    """float32 (m, k, k): per nucleus radius r, the disc-r mean minus the mean over the
    annulus r + gap .. r + gap + width, as one kernel (zero-padded to a common size), so
    one convolution gives every scale's centre-surround response."""
    kernels = []
    for r_um in params.radii_um:
        r0 = (r_um + params.surround_gap_um) / wmpp
        disc = annulus_kernel(0.0, r_um / wmpp, device=device)
        ring = annulus_kernel(r0, r0 + params.surround_width_um / wmpp, device=device)
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


def find_cell_peaks(response: torch.Tensor, *, nms_radius_px: float, merge_radius_px: float,
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


def sector_kernels(r_in_px: float, r_out_px: float, *, n: int = 8, device=None,
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


def mirror_outside(rgb_nhwc: torch.Tensor, valid_px: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) images with the pixels outside each image's valid box replaced by its
    mirror image (reflection about the box's edge pixels, repeated if the box is small).

    valid_px: int (N, 4) boxes (x0, y0, x1, y1), end exclusive, in pixels: the part of a
    tile that lies on the slide (a tile reaching past the slide's edge is padded white)."""
    n, h, w, _ = rgb_nhwc.shape
    dev = rgb_nhwc.device
    box = valid_px.to(dev).long()

    def index(length: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        lo = lo.clamp(0, length - 1)
        span = (hi.clamp(1, length) - lo).clamp_min(1)[:, None]
        # reflection about the edge pixels (not repeating them, as F.pad's "reflect"): a
        # nucleus cut by the edge and its mirror image peak on the edge pixel, inside
        period = (2 * span - 2).clamp_min(1)
        u = (torch.arange(length, device=dev)[None] - lo[:, None]) % period
        return torch.where(u >= span, period - u, u).clamp(max=span - 1) + lo[:, None]

    ry, rx = index(h, box[:, 1], box[:, 3]), index(w, box[:, 0], box[:, 2])
    batch = torch.arange(n, device=dev)[:, None, None]
    return rgb_nhwc[batch, ry[:, :, None], rx[:, None, :]]


def find_nuclei(hx: torch.Tensor, dab: torch.Tensor, *, wmpp: float, p: NucleusParams,
                valid: torch.Tensor | None = None):
    """Nuclei of (N, 1, H, W) haematoxylin and DAB concentrations at `wmpp` µm/px, the
    same for every marker: (peaks float (n, 4) rows (image, x, y, response) in working
    px, pixel centres at +0.5, :class:`~tilscore.ihc_nuclei.NucleusShape`). valid: None
    (the whole image is real) or float (N, 4) boxes (x0, y0, x1, y1) in working px of the
    real part of each image; a nucleus is segmented within it (not into its mirror
    image), so one cut by the edge is measured by its visible part."""
    dev = hx.device
    stain = hx + p.dab_weight * dab
    response = _region_mean(stain, _centre_surround_kernels(p, wmpp, dev)).amax(
        dim=1, keepdim=True)
    peaks = find_cell_peaks(response, nms_radius_px=p.nms_radius_um / wmpp, merge_radius_px=0.0,
                            threshold=p.min_signal_od)
    if len(peaks) > 1 and p.merge_radius_um > p.nms_radius_um:
        smooth = _region_mean(stain, annulus_kernel(0.0, p.smooth_um / wmpp, device=dev))
        peaks = peaks[merge_without_saddle(smooth, peaks, radius_px=p.merge_radius_um / wmpp,
                                           saddle_fraction=p.saddle_fraction)]
    b, iy, ix = peaks[:, 0].long(), peaks[:, 2].long(), peaks[:, 1].long()
    window = max(1, int(round(p.window_um / wmpp)))
    seg_stain = stain if p.segment_dab_weight == p.dab_weight else hx + p.segment_dab_weight * dab
    if valid is None:
        h, w = hx.shape[-2:]
        valid = torch.tensor([[0.0, 0.0, w, h]], device=dev).expand(hx.shape[0], 4)
    bounds = valid.to(dev).float()[b]
    seg, contrast = segment_nuclei(seg_stain, b=b, iy=iy, ix=ix, window_px=window,
                                   core_px=p.core_um / wmpp, level=p.level,
                                   bounds=bounds)
    # segments that reach the first or last real row or column: cut by the edge
    t = torch.arange(-window, window + 1, device=dev, dtype=torch.float32)
    cols, rows = ix[:, None].float() + t[None], iy[:, None].float() + t[None]
    rim_x = (cols == bounds[:, 0:1].ceil()) | (cols == bounds[:, 2:3].ceil() - 1)
    rim_y = (rows == bounds[:, 1:2].ceil()) | (rows == bounds[:, 3:4].ceil() - 1)
    rim = rim_y[:, :, None] | rim_x[:, None, :]
    shape = nucleus_shape(seg, wmpp, contrast=contrast)
    return peaks, replace(shape, cut_by_edge=(seg & rim).flatten(1).any(1))


def _inside_stronger_blob(blob: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          b: torch.Tensor, excess: torch.Tensor, window: int) -> torch.Tensor:
    """bool (n,): the cell's centre lies in the DAB blob (bool (n, k, k), centred on each
    cell's pixel, k = 2 window + 1) of a cell with a larger DAB excess: one DAB-filled
    nucleus is one positive cell, however many candidates its stain gave."""
    n = len(x)
    out = torch.zeros(n, dtype=torch.bool, device=x.device)
    if n < 2:
        return out
    dx = x.long()[None, :] - x.long()[:, None]  # (owner i, cell j): j relative to i
    dy = y.long()[None, :] - y.long()[:, None]
    near = (dx.abs() <= window) & (dy.abs() <= window) & (b[:, None] == b[None, :])
    near &= excess[:, None] > excess[None, :]
    i, j = torch.nonzero(near, as_tuple=True)
    if len(i):
        hit = blob[i, dy[i, j] + window, dx[i, j] + window]
        out[j[hit]] = True
    return out


def detect_cells(rgb_uint8_nhwc: torch.Tensor, mpp: float, *, marker: str,
                 params: IhcParams | None = None, stain_matrix=None,
                 valid_px: torch.Tensor | None = None) -> list[CellsOnTile]:
    """Detect nuclei, gate them and score them for the marker (see the module docstring).

    rgb_uint8_nhwc: uint8 (N, H, W, 3) on any device. mpp: µm per input pixel.
    marker: "foxp3" or "cd20"; params: None = :func:`ihc_params` defaults of the marker.
    stain_matrix: (3, 3) rows H, DAB, residual, a :class:`~tilscore.ihc.StainVectors`, or
    None (Ruifrok defaults). valid_px: None, or int (N, 4) boxes (x0, y0, x1, y1) in input
    pixels of the part of each image that is real: outside it the image is mirrored and
    no cell is reported. Returns one :class:`CellsOnTile` per image.
    """
    params = params or ihc_params(marker)
    if params.marker != marker:
        raise UsageError(f"IhcParams are for {params.marker!r}, not {marker!r}")
    if rgb_uint8_nhwc.ndim != 4 or rgb_uint8_nhwc.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB, got {tuple(rgb_uint8_nhwc.shape)}")
    nuc = params.nuclei
    if valid_px is not None:
        rgb_uint8_nhwc = mirror_outside(rgb_uint8_nhwc, valid_px)
    rgb, (sy, sx) = _resample(rgb_uint8_nhwc, float(mpp), nuc.working_mpp)
    wmpp = float(mpp) * math.sqrt(sy * sx)  # µm per working pixel
    conc = deconvolve(rgb, stain_matrix)
    hx, dab = conc[:, 0:1].clamp_min(0.0), conc[:, 1:2].clamp_min(0.0)
    dev = dab.device
    valid_w = None  # the valid boxes in working px
    if valid_px is not None:
        scale = torch.tensor([sx, sy, sx, sy], device=dev, dtype=torch.float32)
        valid_w = valid_px.to(dev).float() / scale
    peaks, shape = find_nuclei(hx, dab, wmpp=wmpp, p=nuc, valid=valid_w)
    b = peaks[:, 0].long()
    xw, yw = peaks[:, 1], peaks[:, 2]
    # Cells centred on the mirrored margin are not real. (A nucleus cut by the edge and
    # its mirror image make one blob centred on the edge, whichever side its centre was:
    # at an image's edge cells are counted as labelled sets count them, by their visible
    # part; on a whole slide tissue rarely meets the edge.)
    inside = torch.ones(len(b), dtype=torch.bool, device=dev)
    if valid_px is not None:
        box = valid_px.to(dev).float()[b]
        inside = ((xw * sx >= box[:, 0]) & (xw * sx < box[:, 2])
                  & (yw * sy >= box[:, 1]) & (yw * sy < box[:, 3]))

    # The marker: DAB per compartment against the local background.
    nucleus = annulus_kernel(0.0, params.nucleus_radius_um / wmpp, device=dev)
    membrane = annulus_kernel(params.membrane_um[0] / wmpp, params.membrane_um[1] / wmpp,
                              device=dev)
    core = annulus_kernel(0.0, params.core_um / wmpp, device=dev)
    sectors = sector_kernels(params.background_um[0] / wmpp, params.background_um[1] / wmpp,
                             n=8, device=dev)
    radius = max(k.shape[-1] // 2 for k in (nucleus, membrane, core, sectors))
    iy, ix = yw.long(), xw.long()
    win = patches(dab, b=b, iy=iy, ix=ix, radius_px=radius)
    dab_nucleus = _weighted(win, nucleus[None])[:, 0]
    dab_membrane = _weighted(win, membrane[None])[:, 0]
    background = _weighted(win, sectors).amin(dim=1)
    h_win = patches(hx, b=b, iy=iy, ix=ix, radius_px=core.shape[-1] // 2)
    h_core = _weighted(h_win, core[None])[:, 0]
    d_core = _weighted(win, core[None])[:, 0]
    h_fraction = h_core / (h_core + d_core).clamp_min(1e-6)
    dab_od = dab_nucleus if params.compartment == "nucleus" else dab_membrane
    excess = dab_od - background
    gate = (lymphocyte_gate(peaks[:, 3], shape, params=nuc,
                            extra_diameter_um=2 * params.stained_rim_um)
            if nuc.lymphocyte_gate
            else torch.zeros(len(b), dtype=torch.int8, device=dev))
    stained = excess >= params.dab_threshold_od
    check = torch.nonzero(stained & (gate == 0)).flatten()
    if params.compartment == "membrane":
        misplaced = h_fraction[check] < params.min_haematoxylin_fraction
    else:
        window = max(1, int(round(params.blob_window_um / wmpp)))
        blob, _ = segment_nuclei(dab, b=b[check], iy=iy[check], ix=ix[check], window_px=window,
                                 core_px=params.core_um / wmpp, separate=False, flood=True)
        misplaced = nucleus_shape(blob, wmpp, contrast=excess[check]).touches_window
        misplaced |= _inside_stronger_blob(blob, xw[check], yw[check], b[check],
                                           excess[check], window)
    gate[check[misplaced]] = GATES.index("marker_location")
    positive = stained & (gate == 0)
    bins = torch.tensor(params.bins_od, device=dev, dtype=excess.dtype)
    # As QuPath's positive % and H-score agree: a negative cell is bin 0, a positive cell
    # at least "weak" (1), whatever the bin limits are against the threshold.
    graded = torch.bucketize(excess, bins, right=True).clamp_min(1)
    intensity = torch.where(positive, graded, torch.zeros_like(graded)).to(torch.int8)
    # A cell is reported at its nucleus's centroid (as QuPath places a detection, and as
    # labelled sets give the centroid of each mask), not at the peak of the centre-surround
    # response: that peak sits on the darkest part of the cell (a thick crescent of a
    # ring-stained cell's membrane) and, at an image's edge, on the edge pixel (a cut
    # nucleus and its mirror image are symmetric about it), while the segment holds only
    # the visible part. Which cells exist (and `inside`) still follows the peak.
    xc = xw + shape.centroid_dx_px.to(xw.dtype)
    yc = yw + shape.centroid_dy_px.to(yw.dtype)
    out = []
    for i in range(rgb.shape[0]):
        sel = (b == i) & inside
        out.append(CellsOnTile(
            x_px=(xc[sel] * sx).float(), y_px=(yc[sel] * sy).float(),
            dab_od=dab_od[sel].float(), dab_background_od=background[sel].float(),
            positive=positive[sel], score=peaks[sel, 3], intensity_bin=intensity[sel],
            dab_nucleus_od=dab_nucleus[sel].float(), dab_membrane_od=dab_membrane[sel].float(),
            haematoxylin_fraction=h_fraction[sel].float(),
            nucleus_area_um2=shape.area_um2[sel].float(),
            nucleus_axis_ratio=shape.axis_ratio[sel].float(), gate=gate[sel]))
    return out
