"""Device selection and batched prediction: uint8 tiles in, region maps and cell peaks out.

All post-processing runs on the device (softmax/argmax, region pooling, heatmap peak
finding by max-pool non-maximum suppression); only small results cross back to the host.
On CUDA: bf16 autocast, channels_last, pinned host memory and non-blocking copies.
On CPU: float32 through the same code path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tilscore.errors import UsageError
from tilscore.qc import focus_measure

log = logging.getLogger(__name__)


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec} requested but CUDA is not available on this machine "
                             "(use --device cpu or auto)")
        index = 0 if spec == "cuda" else spec.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: no such GPU (found {torch.cuda.device_count()})")
        return torch.device(f"cuda:{int(index)}")
    raise UsageError(f"unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N")


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware: cgroups, taskset, Slurm)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure_cpu_threads(reserve_for_loader: int = 0, threads: int | None = None) -> int:
    """Intra-op threads: `threads` when given (workers sharing a node), else every core
    we are allowed minus `reserve_for_loader`."""
    n = max(1, threads if threads is not None else usable_cores() - reserve_for_loader)
    torch.set_num_threads(n)
    return n


@dataclass
class TilePredictions:
    """Host-side results for a batch of B tiles, restricted to their cores.

    ``regions``: uint8 (B, core/f, core/f) region labels at the region-map resolution
    (f = region_factor); ``cells``: float32 (N, 5) rows of (tile_in_batch, class,
    x_px, y_px, score), x/y in tile pixels (pixel centres, .5); ``nucleus_fraction``:
    float32 (B, core/f, core/f) fraction of each region pixel covered by predicted
    lymphocyte nuclei (None when the model has no nucleus channel); ``focus``: float32
    (B,) QC focus measure of each core (tilscore.qc.focus_measure).
    """

    regions: np.ndarray
    cells: np.ndarray
    nucleus_fraction: np.ndarray | None
    focus: np.ndarray


class Predictor:
    """Runs a TilNet on batches of uint8 NHWC tiles and decodes them on the device."""

    def __init__(self, model, card, device: torch.device, region_factor: int = 4):
        self.card = card
        self.device = device
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()
        self.region_factor = int(region_factor)
        self.n_regions = len(card.region_classes)
        self.n_cells = len(card.cell_classes)
        self.core = card.tile_px - 2 * card.overlap_px
        if self.core % self.region_factor:
            raise UsageError(f"tile core {self.core} px is not divisible by the region factor "
                             f"{self.region_factor}")
        nms_px = card.heatmap.nms_radius_um / card.input_mpp
        self.nms_kernel = 2 * max(1, int(round(nms_px))) + 1
        self.use_bf16 = False
        if device.type == "cuda":
            with torch.cuda.device(device):
                self.use_bf16 = torch.cuda.is_bf16_supported()

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            images = images.pin_memory() if not images.is_pinned() else images
            images = images.to(self.device, non_blocking=True)
        # NHWC memory permuted to NCHW is exactly channels_last: no copy.
        return images.permute(0, 3, 1, 2)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, cell_rule=None) -> TilePredictions:
        """`images`: torch.uint8 (B, tile, tile, 3). See :class:`TilePredictions`.

        `cell_rule` (e.g. :class:`tilscore.ihc_cells.IhcCellRule`) replaces the heatmap
        peaks as the source of cells: called with the uint8 NHWC batch on the device and
        the core (start, stop), it returns float32 (N, 5 + k) rows like ``cells``."""
        x = self._to_device(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.model(x)
        logits = logits.float()
        ov, core, f = self.card.overlap_px, self.core, self.region_factor
        r, c = self.n_regions, self.n_cells
        # Regions: average class probabilities over f x f pixels of the core, then argmax.
        probs = logits[:, :r, ov : ov + core, ov : ov + core].softmax(dim=1)
        regions = F.avg_pool2d(probs, f).argmax(dim=1).to(torch.uint8)
        if cell_rule is None:
            cells = self._peaks(torch.sigmoid(logits[:, r : r + c]))
        else:  # NCHW channels_last permuted back is the NHWC batch (a view)
            cells = cell_rule(x.permute(0, 2, 3, 1), (ov, ov + core))
        nucleus = None
        if self.card.nucleus_mask:
            mask = (logits[:, r + c, ov : ov + core, ov : ov + core] > 0).float()
            nucleus = F.avg_pool2d(mask[:, None], f)[:, 0]
        focus = focus_measure(x, core=(ov, ov + core))
        return TilePredictions(
            regions=regions.cpu().numpy(),
            cells=cells.cpu().numpy(),
            nucleus_fraction=None if nucleus is None else nucleus.cpu().numpy(),
            focus=focus.cpu().numpy(),
        )

    def _peaks(self, heat: torch.Tensor) -> torch.Tensor:
        ov, core = self.card.overlap_px, self.core
        return find_peaks(heat, self.nms_kernel, self.card.heatmap.threshold,
                          core=(ov, ov + core))


def find_peaks(heat: torch.Tensor, kernel: int, threshold: float,
               core: tuple[int, int] | None = None) -> torch.Tensor:
    """Local maxima of sigmoid heatmaps (B, C, H, W) above `threshold`, by max-pool NMS.

    Returns float32 (N, 5) rows (batch index, class, x_px, y_px, score) with pixel-centre
    coordinates. `core` = (start, stop) keeps only peaks inside that square (the tile core:
    a cell belongs to the tile whose core holds its centre, so none is counted twice).
    A location that peaks in two class maps keeps only the stronger class.

    Exact ties (a plateau, e.g. a symmetric blob centred on a pixel corner) would all
    survive max-pool NMS; a tiny ramp, linear in position and added in float64, makes the
    lowest-right pixel win. Being linear, it orders two pixels the same way in every tile
    that sees both, so a cell on a core border is still kept by exactly one tile.
    """
    h, w = heat.shape[-2:]
    ramp = torch.arange(h * w, device=heat.device, dtype=torch.float64).view(h, w)
    ranked = heat.double() + ramp * (1e-6 / (h * w))
    pooled = F.max_pool2d(ranked, kernel, stride=1, padding=kernel // 2)
    keep = (ranked == pooled) & (heat > threshold)
    if core is not None:
        inside = torch.zeros_like(keep)
        inside[..., core[0] : core[1], core[0] : core[1]] = True
        keep &= inside
    best = heat.argmax(dim=1, keepdim=True)
    keep &= torch.arange(heat.shape[1], device=heat.device).view(1, -1, 1, 1) == best
    b, cls, y, x = keep.nonzero(as_tuple=True)
    score = heat[b, cls, y, x]
    return torch.stack([b.float(), cls.float(), x.float() + 0.5, y.float() + 0.5, score], 1)


@dataclass
class SlidePrediction:
    """Predictions for a whole slide.

    ``canvas``: :class:`~tilscore.stitch.RegionCanvas` (zarr-backed region labels and
    lymphocyte-nucleus coverage); ``cells``: columns ``x_px``, ``y_px`` (float64 level-0
    px), ``cls`` (int16 index into card.cell_classes), ``score`` (float32);
    ``tiles``/``failed_tiles``: counts; ``focus``: float32 (len(grid),) QC focus
    measure per tile in grid order (NaN: not measured or failed);
    ``timings_s``: seconds per stage (``read`` = waiting for the loader, ``model``,
    ``stitch``).
    """

    canvas: object
    cells: dict
    tiles: int
    failed_tiles: int
    timings_s: dict
    focus: np.ndarray


def predict_slide(slide, grid, predictor: Predictor, store_path, workers: int = 2,
                  batch_size: int = 8, progress=None, tissue=None,
                  cell_rule=None) -> SlidePrediction:
    """Stream the grid's tiles through `predictor`, stitching cores into a RegionCanvas at
    `store_path` and collecting cells. `progress(n_tiles_done)` is called per batch;
    `tissue` (a TissueMask) makes the tissue detector the authority on tissue vs glass;
    `cell_rule` replaces the heatmap cells (see :meth:`Predictor.predict`); its
    ``extra_columns`` become extra cell-table columns."""
    import time

    from tilscore.stitch import CellCollector, RegionCanvas
    from tilscore.tiles import LoaderStats, iter_tile_batches

    canvas = RegionCanvas(store_path, grid, predictor.region_factor, tissue=tissue)
    collector = CellCollector(grid.downsample, getattr(cell_rule, "extra_columns", ()))
    stats = LoaderStats()
    timings = {"read": 0.0, "model": 0.0, "stitch": 0.0}
    focus = np.full(len(grid), np.nan, np.float32)
    t_wait = time.perf_counter()
    for batch in iter_tile_batches(slide, grid, batch_size=batch_size, workers=workers,
                                   stats=stats):
        t_model = time.perf_counter()
        timings["read"] += t_model - t_wait
        pred = predictor.predict(batch.images, cell_rule)
        t_stitch = time.perf_counter()
        timings["model"] += t_stitch - t_model
        canvas.write(grid.cols[batch.index], grid.rows[batch.index], pred.regions,
                     pred.nucleus_fraction)
        collector.add(batch.origins_px, pred.cells)
        focus[batch.index] = pred.focus
        timings["stitch"] += time.perf_counter() - t_stitch
        if progress is not None:
            progress(len(batch.index))
        t_wait = time.perf_counter()
    return SlidePrediction(canvas, collector.table(), stats.tiles, len(stats.failed_tiles),
                           timings, focus)
