"""Device selection and batched prediction: uint8 tiles in, region maps and cell peaks out.

All post-processing runs on the device (softmax/argmax, region pooling, heatmap peak
finding by max-pool non-maximum suppression); only small results cross back to the host.
On CUDA: bf16 autocast, channels_last, pinned host memory and non-blocking copies.
On CPU the same code path, in bf16 where the CPU has it natively, else float32
(:func:`bf16_is_native`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tilscore.engine.defaults import BATCH_SIZE, DECODE_MODES, DEFAULT_DECODE
from tilscore.engine.device_decode import device_tile_reader, iter_device_batches
from tilscore.engine.stitch import CellCollector, RegionCanvas
from tilscore.errors import UsageError
from tilscore.prepare.tiles import LoaderStats, SlideRef, iter_tile_batches, prefetch
from tilscore.scoring.qc import focus_measure, region_uncertainty, tissue_weighted_mean

log = logging.getLogger(__name__)


REGION_MAP_MPP = 2.0  # µm/px of the stitched region map (the issue asks for 2-4 µm/px)


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


def default_read_threads(device: torch.device, cores: int) -> int:
    """Tile decoding threads for one slide: 2 on CPU (the model needs the cores; two
    already hide decoding, docs/benchmarks.md); on CUDA all but two of `cores` (the
    GPU outruns decoding, so decoding sets the pace)."""
    return max(2, cores - 2) if device.type == "cuda" else 2


def default_batch_size(device: torch.device) -> int:
    """Tiles per model batch on `device` (:data:`~tilscore.engine_defaults.BATCH_SIZE`:
    8 on CPU, 32 on CUDA; docs/benchmarks.md)."""
    return BATCH_SIZE["cuda" if device.type == "cuda" else "cpu"]


@dataclass
class TilePredictions:
    """Host-side results for a batch of B tiles, restricted to their cores.

    ``regions``: uint8 (B, core/f, core/f) region labels at the region-map resolution
    (f = region_factor); ``cells``: float32 (N, 5) rows of (tile_in_batch, class,
    x_px, y_px, score), x/y in tile pixels (pixel centres, .5); ``nucleus_fraction``:
    float32 (B, core/f, core/f) fraction of each region pixel covered by predicted
    lymphocyte nuclei (None when the model has no nucleus channel); ``focus``: float32
    (B,) QC focus measure of each core (tilscore.qc.focus_measure); ``uncertain``:
    float32 (B,) QC share of each core's tissue whose region class is uncertain
    (tilscore.qc.region_uncertainty; NaN: no tissue).
    """

    regions: np.ndarray
    cells: np.ndarray
    nucleus_fraction: np.ndarray | None
    focus: np.ndarray
    uncertain: np.ndarray | None = None


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on `device`: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX instructions (elsewhere oneDNN emulates bf16, slower than
    float32). The env var TILSCORE_FLOAT32=1 turns it off (float32 everywhere)."""
    if os.environ.get("TILSCORE_FLOAT32", "") not in ("", "0"):
        return False
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


class Predictor:
    """Runs a TilNet on batches of uint8 NHWC tiles and decodes them on the device."""

    # Peaks kept per tile before the exact (synchronising) fallback: a 512 px tile at
    # 0.5 µm/px is 0.066 mm²; 2,048 cells there is 31,000 per mm², above packed lymphocytes.
    max_peaks_per_tile = 2048

    def __init__(self, model, card, device: torch.device, region_factor: int | None = None,
                 compile_model: bool | str = False):
        self.card = card
        self.device = device
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()
        # torch.compile of the forward pass and its decoding, one batch shape (optional: the
        # compile time pays only on long runs). `compile_model`: True (torch's default
        # mode) or a mode name; "reduce-overhead" replays CUDA graphs on CUDA (one launch
        # per batch instead of ~200), whose outputs the next replay overwrites.
        self.compile_mode = ("default" if compile_model is True else compile_model) or None
        self._compute = (torch.compile(self._compute_eager, mode=self.compile_mode,
                                       dynamic=False)
                         if self.compile_mode else self._compute_eager)
        self._graphs = self.compile_mode not in (None, "default")  # modes with CUDA graphs
        self._batch_n = 0  # compiled: the largest batch so far; smaller ones are padded
        # The region map is at REGION_MAP_MPP whatever the model's mpp: 4x pooling for a
        # 0.5 µm/px model, none for a 2 µm/px region model.
        self.region_factor = int(region_factor or max(1, round(REGION_MAP_MPP / card.input_mpp)))
        self.n_regions = len(card.region_classes)
        self.background_index = (card.region_classes.index("background")
                                 if "background" in card.region_classes else None)
        self.n_cells = len(card.cell_classes)
        self.core = card.tile_px - 2 * card.overlap_px
        if self.core % self.region_factor:
            raise UsageError(f"tile core {self.core} px is not divisible by the region factor "
                             f"{self.region_factor}")
        nms_px = card.heatmap.nms_radius_um / card.input_mpp
        self.nms_kernel = 2 * max(1, int(round(nms_px))) + 1
        self.use_bf16 = bf16_is_native(device)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and images.device != self.device:
            images = images.pin_memory() if not images.is_pinned() else images
            images = images.to(self.device, non_blocking=True)
        # NHWC memory permuted to NCHW is exactly channels_last: no copy.
        return images.permute(0, 3, 1, 2)

    def launch(self, images: torch.Tensor, *, cell_rule=None,
               origins_px: np.ndarray | None = None) -> PendingBatch:
        """Queue a batch on the device and start copying its results to the host;
        :meth:`collect` turns it into :class:`TilePredictions`.

        `images`: torch.uint8 (B, tile, tile, 3). `cell_rule` (e.g.
        :class:`tilscore.ihc_cells.IhcCellRule`) replaces the heatmap peaks as the source
        of cells: called with the uint8 NHWC batch on the device and the core (start,
        stop), and the tiles' top-left `origins_px` (int (B, 2) grid px, None: unknown) so
        it can tell the slide's edge, it returns float32 (N, 5 + k) rows like ``cells``.

        On CUDA nothing here waits for the GPU (no host synchronisation: peaks are
        compacted to a fixed size by top-k, copies are non-blocking into pinned memory
        and an event marks their end), so the caller can read and stitch other batches
        while this one runs; :meth:`collect` waits for it. A `cell_rule` is evaluated
        eagerly (it may synchronise)."""
        n = images.shape[0]
        if self.compile_mode:  # one compiled shape: pad a short (last) batch with blank tiles
            self._batch_n = max(self._batch_n, n)
            if n < self._batch_n:
                pad = images.new_zeros((self._batch_n - n, *images.shape[1:]))
                images = torch.cat([images, pad])
            if self._graphs:  # the last replay's outputs are dead from here
                torch.compiler.cudagraph_mark_step_begin()
        x = self._to_device(images)
        # torch.compile fails on inference tensors' views: plain no_grad when compiled.
        with torch.no_grad() if self.compile_mode else torch.inference_mode():
            out, heat = self._compute(x, cell_rule is None)
            if n < x.shape[0]:
                out = {k: v[:n] for k, v in out.items()}
                heat = None if heat is None else heat[:n]
            if heat is not None and self._graphs:
                heat = heat.clone()  # kept for the exact fallback after the next replay
            if cell_rule is not None:  # NCHW channels_last permuted back: the NHWC batch
                ov = self.card.overlap_px
                out["cells"] = cell_rule(x[:n].permute(0, 2, 3, 1), (ov, ov + self.core),
                                         origins_px)
            return PendingBatch(self._to_host(out), heat, _record_event(self.device))

    def _compute_eager(self, x: torch.Tensor, peaks: bool) -> tuple[dict, torch.Tensor | None]:
        """The device work of :meth:`launch` (no host synchronisation): the network and
        the decoding of its logits into the fixed-size results; and the cell heatmaps (None
        when `peaks` is false or the model has no cell classes)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.model(x)
        logits = logits.float()
        ov, core, f = self.card.overlap_px, self.core, self.region_factor
        r, c = self.n_regions, self.n_cells
        # Regions: average class probabilities over f x f pixels of the core, then argmax.
        probs = F.avg_pool2d(logits[:, :r, ov : ov + core, ov : ov + core].softmax(dim=1), f)
        out = {"regions": probs.argmax(dim=1).to(torch.uint8),
               "focus": focus_measure(x, core=(ov, ov + core)),
               "uncertain": region_uncertainty(probs, self.background_index)}
        if self.card.nucleus_mask:
            mask = (logits[:, r + c, ov : ov + core, ov : ov + core] > 0).float()
            out["nucleus"] = F.avg_pool2d(mask[:, None], f)[:, 0]
        heat = None
        if peaks and c == 0:  # a region-only model
            out["cells"] = torch.zeros((0, 5), dtype=torch.float32, device=x.device)
        elif peaks:
            heat = torch.sigmoid(logits[:, r : r + c])
            out["peak_score"], out["peak_index"] = top_peaks(
                heat, self.nms_kernel, threshold=self.card.heatmap.threshold, core=(ov, ov + core),
                k=self.max_peaks_per_tile)
        return out, heat

    @torch.inference_mode()
    def collect(self, pending: PendingBatch) -> TilePredictions:
        """Wait for a launched batch and decode its host copies."""
        if pending.event is not None:
            pending.event.synchronize()
        host = {k: v.numpy() for k, v in pending.host.items()}
        if "cells" in host:
            cells = host["cells"]
        else:
            cells = _decode_peaks(host["peak_score"], host["peak_index"],
                                  pending.heat.shape[-2:])
            if (host["peak_score"] >= 0).all(axis=1).any():  # a tile at the cap: exact search
                ov, core = self.card.overlap_px, self.core
                log.warning("more than %d cells in a tile: exact peak search",
                            self.max_peaks_per_tile)
                cells = find_peaks(pending.heat, self.nms_kernel,
                                   threshold=self.card.heatmap.threshold,
                                   core=(ov, ov + core)).cpu().numpy()
        return TilePredictions(regions=host["regions"], cells=cells,
                               nucleus_fraction=host.get("nucleus"), focus=host["focus"],
                               uncertain=host["uncertain"])

    def _to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type != "cuda":
            return {k: v.cpu() for k, v in tensors.items()}
        host = {}
        for k, v in tensors.items():
            host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host[k].copy_(v, non_blocking=True)
        return host


@dataclass
class PendingBatch:
    """A launched batch: host tensors being filled, the heatmaps (kept on the device for
    the rare exact fallback) and the CUDA event after the last copy (None on CPU)."""

    host: dict
    heat: torch.Tensor | None
    event: object


def _record_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def peak_mask(heat: torch.Tensor, kernel: int, *, threshold: float,
              core: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean (B, C, H, W): local maxima of sigmoid heatmaps above `threshold`, by
    max-pool non-maximum suppression, inside `core` = (start, stop) when given (the tile
    core: a cell belongs to the tile whose core holds its centre, so none is counted
    twice). A location that peaks in two class maps keeps only the stronger class.

    Exact ties (a plateau, e.g. a symmetric blob centred on a pixel corner) would all
    survive max-pool NMS; a tiny ramp, linear in position and added in float64, makes the
    lowest-right pixel win. Being linear, it orders two pixels the same way in every tile
    that sees both, so a cell on a core border is still kept by exactly one tile.
    """
    h, w = heat.shape[-2:]
    ramp = torch.arange(h * w, device=heat.device, dtype=torch.float64).view(h, w)
    ramp = ramp * (1e-6 / (h * w))
    full = heat
    if core is not None:  # only the core and the pixels within `kernel // 2` of it matter
        a, b = max(0, core[0] - kernel // 2), min(min(h, w), core[1] + kernel // 2)
        heat, ramp = heat[..., a:b, a:b], ramp[a:b, a:b]
    heat = heat.contiguous()  # (channels_last slices pool 1.6x slower on CPU)
    ranked = heat.double() + ramp
    # A square max-pool is separable: rows then columns (2k instead of k² comparisons).
    pooled = F.max_pool2d(ranked, (kernel, 1), stride=1, padding=(kernel // 2, 0))
    pooled = F.max_pool2d(pooled, (1, kernel), stride=1, padding=(0, kernel // 2))
    keep = (ranked == pooled) & (heat > threshold)
    best = heat.max(dim=1, keepdim=True).indices  # = argmax (first on ties), 10x faster on CPU
    keep &= torch.arange(heat.shape[1], device=heat.device).view(1, -1, 1, 1) == best
    if core is None:
        return keep
    out = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
    c0, c1 = core[0] - a, core[1] - a
    out[..., core[0] : core[1], core[0] : core[1]] = keep[..., c0:c1, c0:c1]
    return out


def find_peaks(heat: torch.Tensor, kernel: int, *, threshold: float,
               core: tuple[int, int] | None = None) -> torch.Tensor:
    """Peaks of :func:`peak_mask` as float32 (N, 5) rows (batch index, class, x_px, y_px,
    score) with pixel-centre coordinates, in (batch, class, y, x) order. Synchronises
    with the device (the number of peaks decides the output size)."""
    keep = peak_mask(heat, kernel, threshold=threshold, core=core)
    b, cls, y, x = keep.nonzero(as_tuple=True)
    score = heat[b, cls, y, x]
    return torch.stack([b.float(), cls.float(), x.float() + 0.5, y.float() + 0.5, score], 1)


def top_peaks(heat: torch.Tensor, kernel: int, *, threshold: float, core: tuple[int, int],
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same peaks as :func:`find_peaks` in a fixed-size form that needs no host
    synchronisation: per tile, the `k` largest of (score where a peak, else -1) as
    float32 (B, k) scores and int32 (B, k) flat indices into (C, H, W), unordered. A tile
    whose `k` scores are all ≥ 0 may have had more than `k` peaks."""
    keep = peak_mask(heat, kernel, threshold=threshold, core=core)
    masked = torch.where(keep, heat, torch.full_like(heat, -1.0)).flatten(1)
    score, index = masked.topk(min(k, masked.shape[1]), dim=1, sorted=False)
    return score, index.to(torch.int32)


def _decode_peaks(score: np.ndarray, index: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """float32 (N, 5) rows as :func:`find_peaks` returns them (same order) from
    :func:`top_peaks`' host copies."""
    h, w = (int(v) for v in hw)
    b, j = np.nonzero(score >= 0)
    flat = index[b, j].astype(np.int64)
    cls, y, x = flat // (h * w), (flat // w) % h, flat % w
    order = np.lexsort((x, y, cls, b))
    b, cls, y, x, s = b[order], cls[order], y[order], x[order], score[b, j][order]
    return np.stack([b, cls, x + 0.5, y + 0.5, s], 1).astype(np.float32)


@dataclass
class SlidePrediction:
    """Predictions for a whole slide.

    ``canvas``: :class:`~tilscore.stitch.RegionCanvas` (zarr-backed region labels and
    lymphocyte-nucleus coverage); ``cells``: columns ``x_px``, ``y_px`` (float64 level-0
    px), ``cls`` (int16 index into card.cell_classes), ``score`` (float32);
    ``tiles``/``failed_tiles``: counts; ``focus``: float32 (len(grid),) QC focus
    measure per tile in grid order (NaN: not measured or failed);
    ``timings_s``: seconds per stage (``read`` = waiting for the loader, ``model``,
    ``stitch``); ``region_uncertain_fraction``: QC share of the tissue whose region
    class the model is unsure of (tissue-weighted over the tiles; None: none measured).
    """

    canvas: object
    cells: dict
    tiles: int
    failed_tiles: int
    timings_s: dict
    focus: np.ndarray
    region_uncertain_fraction: float | None = None


def predict_slide(slide, grid, *, predictor: Predictor, store_path, workers: int = 2,
                  batch_size: int | None = None, progress=None, tissue=None,
                  cell_rule=None, use_processes: bool = False,
                  decode: str = DEFAULT_DECODE) -> SlidePrediction:
    """Stream the grid's tiles through `predictor`, stitching cores into a RegionCanvas at
    `store_path` and collecting cells. `progress(n_tiles_done)` is called per batch;
    `tissue` (a TissueMask) makes the tissue detector the authority on tissue vs glass;
    `cell_rule` replaces the heatmap cells (see :meth:`Predictor.launch`); its
    ``extra_columns`` become extra cell-table columns. `batch_size` None: the device's
    (:func:`default_batch_size`). `use_processes`: decode in worker
    processes (`slide` must then be a :class:`~tilscore.tiles.SlideRef`). `decode`:
    ``host`` (the CPU loader), ``device`` (JPEG file tiles decoded on the predictor's
    device where the slide allows it, :mod:`tilscore.device_decode`) or ``auto``
    (device on CUDA, host on CPU)."""
    canvas = RegionCanvas(store_path, grid, predictor.region_factor, tissue=tissue)
    collector = CellCollector(grid.downsample, getattr(cell_rule, "extra_columns", ()))
    stats = LoaderStats()
    timings = {"read": 0.0, "model": 0.0, "stitch": 0.0}
    focus = np.full(len(grid), np.nan, np.float32)
    uncertain = np.full(len(grid), np.nan, np.float32)

    def finish(batch, pending) -> None:
        t0 = time.perf_counter()
        pred = predictor.collect(pending)
        t1 = time.perf_counter()
        timings["model"] += t1 - t0
        canvas.write(grid.cols[batch.index], grid.rows[batch.index], regions=pred.regions,
                     nucleus_fraction=pred.nucleus_fraction)
        collector.add(batch.origins_px, pred.cells)
        focus[batch.index] = pred.focus
        if pred.uncertain is not None:
            uncertain[batch.index] = pred.uncertain
        timings["stitch"] += time.perf_counter() - t1
        if progress is not None:
            progress(len(batch.index))

    if decode not in DECODE_MODES:
        raise UsageError(f"unknown decode {decode!r}; valid: {', '.join(DECODE_MODES)}")
    batch_size = batch_size or default_batch_size(predictor.device)
    on_device = decode == "device" or (decode == "auto" and predictor.device.type == "cuda")
    reader = (device_tile_reader(slide, grid)
              if on_device and not isinstance(slide, SlideRef) and len(grid) else None)
    batches = (prefetch(iter_device_batches(reader, slide, grid=grid, device=predictor.device,
                                            batch_size=batch_size, stats=stats))
               if reader is not None else
               iter_tile_batches(slide, grid, batch_size=batch_size, workers=workers,
                                 stats=stats, use_processes=use_processes))
    try:
        try:
            _run_batches(batches, predictor, cell_rule, finish, timings)
        finally:
            batches.close()  # stops the loader (and its thread) before the file is closed
            if reader is not None:
                reader.close()
        canvas.flush()
    finally:  # on failure too: no band write may outlive the slide's work folder
        canvas.close()

    return SlidePrediction(canvas, collector.table(), stats.tiles, len(stats.failed_tiles),
                           timings, focus,
                           tissue_weighted_mean(uncertain, grid.tissue_fraction))


def _run_batches(batches, predictor: Predictor, cell_rule, finish, timings: dict) -> None:
    """Launch each batch before finishing the previous one (one batch in flight)."""
    in_flight = None
    t_wait = time.perf_counter()
    for batch in batches:
        t_model = time.perf_counter()
        timings["read"] += t_model - t_wait
        pending = predictor.launch(batch.images, cell_rule=cell_rule, origins_px=batch.origins_px)
        timings["model"] += time.perf_counter() - t_model
        if in_flight is not None:
            finish(*in_flight)
        in_flight = (batch, pending)
        t_wait = time.perf_counter()
    if in_flight is not None:
        finish(*in_flight)
