"""Tile grid at a target resolution and the streaming tile loader.

Grid geometry lives in *grid pixels*: pixels at the target ``mpp`` with (0, 0) at the
slide's level-0 origin, so grid px p ↦ level-0 px p × downsample. Tile *cores* tile the
plane exactly (core c covers grid px [c·core, (c+1)·core)); each tile adds
``overlap_px`` of context on every side. Downstream stitching keeps only cores, so no
pixel or cell is counted twice.

The loader reads *blocks* of up to ``block_tiles`` × ``block_tiles`` tiles with one
``Slide.read`` call (so each file tile is decoded once, not once per overlapping model
tile), cuts tiles out of the block, and yields fixed-size batches. Blocks are decoded
in a thread pool (OpenSlide, imagecodecs and OpenCV release the GIL) or in worker
processes, with at most ``2 × workers`` blocks in flight: memory is bounded by the
block size, never by the slide size.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from tilscore.errors import SlideReadError, UsageError
from tilscore.prepare.tissue import COARSE_MPP, TissueMask, tissue_mask_from_thumbnail
from tilscore.slide import open_slide

log = logging.getLogger(__name__)

# Above this fraction of tiles failing to decode, the slide is failed rather than
# scored with holes (a few bad tiles in a huge slide are reported, not fatal).
MAX_FAILED_TILE_FRACTION = 0.05


@dataclass(frozen=True)
class TileSpec:
    """Model input tiles: ``tile_px`` square at ``mpp`` µm/px, ``overlap_px`` context each side."""

    mpp: float
    tile_px: int = 512
    overlap_px: int = 32

    def __post_init__(self):
        if self.tile_px <= 2 * self.overlap_px:
            raise UsageError(
                f"tile_px ({self.tile_px}) must exceed twice overlap_px ({self.overlap_px})"
            )
        if self.mpp <= 0:
            raise UsageError(f"tile mpp must be positive, got {self.mpp}")

    @classmethod
    def from_card(cls, card) -> TileSpec:
        """The tiles a model takes (its card's ``input_mpp``, ``tile_px``, ``overlap_px``)."""
        return cls(mpp=card.input_mpp, tile_px=card.tile_px, overlap_px=card.overlap_px)

    @property
    def core_px(self) -> int:
        return self.tile_px - 2 * self.overlap_px

    def downsample(self, slide_mpp: float) -> float:
        """Level-0 px per tile px on a slide of `slide_mpp` µm/px."""
        return self.mpp / slide_mpp


@dataclass(frozen=True)
class TileGrid:
    """The tiles to process. Arrays have one entry per tile, in raster order.

    ``cols``/``rows``: int64 (N,) grid cell indices; ``n_cols``/``n_rows``: the full
    grid extent; ``downsample``: level-0 px per grid px (spec.mpp / slide mpp);
    ``tissue_fraction``: float64 (N,) fraction of each core that the tissue mask calls
    tissue (1 without a mask).
    """

    spec: TileSpec
    slide_mpp: float
    slide_dimensions: tuple[int, int]
    n_cols: int
    n_rows: int
    cols: np.ndarray
    rows: np.ndarray
    tissue_fraction: np.ndarray | None = None

    @property
    def downsample(self) -> float:
        return self.spec.downsample(self.slide_mpp)

    def __len__(self) -> int:
        return int(self.cols.size)

    @property
    def origins_px(self) -> np.ndarray:
        """int64 (N, 2) tile top-left (x, y) in grid px (may be negative: context)."""
        core, ov = self.spec.core_px, self.spec.overlap_px
        return np.stack([self.cols * core - ov, self.rows * core - ov], axis=1).astype(np.int64)

    @property
    def origins_l0(self) -> np.ndarray:
        """float64 (N, 2) tile top-left (x, y) in level-0 px."""
        return self.origins_px * self.downsample


def tile_grid(
    slide_dimensions: tuple[int, int],
    slide_mpp: float,
    *, spec: TileSpec,
    mask=None,
    min_tissue_fraction: float = 0.0,
) -> TileGrid:
    """Grid of tiles over the slide, keeping those whose core holds tissue.

    `mask` is a :class:`~tilscore.tissue.TissueMask` (None keeps every tile). A tile is
    kept when the fraction of tissue pixels under its core exceeds `min_tissue_fraction`
    (0 keeps any tile touching tissue).
    """
    w0, h0 = slide_dimensions
    ds = spec.downsample(slide_mpp)
    core = spec.core_px
    n_cols = max(1, int(np.ceil(w0 / ds / core)))
    n_rows = max(1, int(np.ceil(h0 / ds / core)))
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    rows, cols = rows.ravel().astype(np.int64), cols.ravel().astype(np.int64)
    frac = np.ones(rows.size)
    if mask is not None:
        frac = _core_tissue_fraction(mask, spec, n_cols, n_rows).ravel()
        keep = frac > min_tissue_fraction
        rows, cols, frac = rows[keep], cols[keep], frac[keep]
    return TileGrid(spec, float(slide_mpp), (int(w0), int(h0)), n_cols, n_rows, cols, rows,
                    frac)


def select_tiles(grid: TileGrid, mask) -> TileGrid:
    """The tiles of `grid` whose core overlaps a True pixel of `mask` (a
    :class:`~tilscore.tissue.TissueMask`-like grid with ``mask`` and ``mpp``), e.g. the
    tumour-bulk stroma where the fast mode looks for lymphocytes."""
    touched = _core_tissue_fraction(mask, grid.spec, grid.n_cols, grid.n_rows) > 0
    keep = touched[grid.rows, grid.cols]
    frac = None if grid.tissue_fraction is None else grid.tissue_fraction[keep]
    return replace(grid, cols=grid.cols[keep], rows=grid.rows[keep], tissue_fraction=frac)


@dataclass(frozen=True)
class PreparedSlide:
    """A slide made ready for a model: its tissue `thumbnail` (uint8 RGB at ~COARSE_MPP
    µm/px), the tissue `mask` on it, and the `grid` of the model's tiles whose core
    touches tissue."""

    thumbnail: np.ndarray
    mask: TissueMask
    grid: TileGrid


def prepare_slide(slide, card) -> PreparedSlide:
    """Tissue thumbnail, tissue mask and tile grid of an open `slide` (a
    :class:`~tilscore.slide.Slide`) for the model of `card` (:meth:`TileSpec.from_card`)."""
    thumbnail = slide.thumbnail(COARSE_MPP)
    mask = tissue_mask_from_thumbnail(thumbnail, slide.thumbnail_mpp(COARSE_MPP))
    grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec.from_card(card), mask=mask)
    return PreparedSlide(thumbnail, mask, grid)


def _core_tissue_fraction(mask, spec: TileSpec, n_cols: int, n_rows: int) -> np.ndarray:
    """float (n_rows, n_cols) tissue fraction of each tile core, via an integral image."""
    m = mask.mask.astype(np.float64)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1))
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    core_um = spec.core_px * spec.mpp

    def edges(n: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.floor(np.arange(n) * core_um / mask.mpp).astype(int)
        stop = np.ceil((np.arange(n) + 1) * core_um / mask.mpp).astype(int)
        start, stop = np.clip(start, 0, limit), np.clip(stop, 0, limit)
        return start, np.maximum(stop, start)

    x0, x1 = edges(n_cols, m.shape[1])
    y0, y1 = edges(n_rows, m.shape[0])
    total = (
        integral[np.ix_(y1, x1)] - integral[np.ix_(y0, x1)]
        - integral[np.ix_(y1, x0)] + integral[np.ix_(y0, x0)]
    )
    area = np.outer(y1 - y0, x1 - x0)
    return np.divide(total, area, out=np.zeros_like(total), where=area > 0)


# --- loader -------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideRef:
    """Picklable recipe to (re)open a slide in a worker process."""

    path: str
    mpp: float | None = None
    backend: str | None = None

    def open(self):
        return open_slide(self.path, mpp=self.mpp, backend=self.backend)


@dataclass
class TileBatch:
    """``images``: torch.uint8 (B, tile_px, tile_px, 3) RGB (NHWC, i.e. channels_last once
    permuted to NCHW); ``index``: int64 (B,) positions in the grid; ``origins_px``: int64
    (B, 2) tile top-left in grid px."""

    images: object
    index: np.ndarray
    origins_px: np.ndarray


@dataclass
class LoaderStats:
    tiles: int = 0
    failed_tiles: list = field(default_factory=list)
    first_error: str | None = None


def _block_plan(grid: TileGrid, block_tiles: int) -> list[np.ndarray]:
    """Group tile indices into raster-ordered blocks of ≤ block_tiles² neighbouring tiles."""
    bkey = (grid.rows // block_tiles) * ((grid.n_cols + block_tiles - 1) // block_tiles) + (
        grid.cols // block_tiles
    )
    order = np.argsort(bkey, kind="stable")
    bounds = np.flatnonzero(np.diff(bkey[order])) + 1
    return np.split(order, bounds) if order.size else []


_WORKER_SLIDE = None  # per-process slide for ProcessPoolExecutor workers


def _init_worker(ref: SlideRef) -> None:
    global _WORKER_SLIDE
    _WORKER_SLIDE = ref.open()


def _read_block_in_worker(origins_px, spec, downsample):
    return _read_block(_WORKER_SLIDE, origins_px, spec, downsample)


def _read_block(slide, origins_px: np.ndarray, spec: TileSpec, downsample: float):
    """Read the tiles at `origins_px` (grid px, (n, 2)) with one slide read.

    Returns (tiles uint8 (n, tile, tile, 3), failed bool (n,), first error or None).
    On a block decode failure, tiles are retried one by one so one corrupt file tile
    loses only the model tiles that touch it.
    """
    t = spec.tile_px
    n = len(origins_px)
    x0, y0 = origins_px.min(axis=0)
    x1, y1 = origins_px.max(axis=0) + t
    tiles = np.empty((n, t, t, 3), dtype=np.uint8)
    failed = np.zeros(n, dtype=bool)
    try:
        block = slide.read(
            int(round(x0 * downsample)), int(round(y0 * downsample)),
            width=int(x1 - x0), height=int(y1 - y0), mpp=spec.mpp,
        )
        for k, (ox, oy) in enumerate(origins_px - (x0, y0)):
            tiles[k] = block[oy : oy + t, ox : ox + t]
        return tiles, failed, None
    except SlideReadError as exc:
        first_error = str(exc)
    for k, (ox, oy) in enumerate(origins_px):
        try:
            tiles[k] = slide.read(
                int(round(ox * downsample)), int(round(oy * downsample)),
                width=t, height=t, mpp=spec.mpp,
            )
        except SlideReadError:
            failed[k] = True
            tiles[k] = 255
    return tiles, failed, first_error


def check_failures(stats: LoaderStats, idx: np.ndarray, *, failed: np.ndarray,
                   error: str | None, n_tiles: int) -> None:
    """Record a block's failed tiles in `stats`; raise SlideReadError once more than
    MAX_FAILED_TILE_FRACTION of the slide's `n_tiles` have failed."""
    if not failed.any():
        return
    stats.failed_tiles.extend(int(i) for i in idx[failed])
    stats.first_error = stats.first_error or error
    if len(stats.failed_tiles) > int(np.ceil(MAX_FAILED_TILE_FRACTION * n_tiles)):  # ≥ 1
        raise SlideReadError(f"{len(stats.failed_tiles)} of {n_tiles} tiles failed to decode "
                             f"(first error: {stats.first_error})")
    log.warning("%d tiles failed to decode: %s", int(failed.sum()), error)


def iter_tile_batches(
    slide,
    grid: TileGrid,
    *,
    batch_size: int,
    workers: int = 2,
    block_tiles: int = 4,
    use_processes: bool = False,
    stats: LoaderStats | None = None,
) -> Iterator[TileBatch]:
    """Stream the grid's tiles in batches (block by block; deterministic order).

    `slide` is an open Slide (thread mode) or a :class:`SlideRef` (either mode; needed for
    processes). Tiles that fail to decode are skipped and listed in ``stats.failed_tiles``;
    if more than MAX_FAILED_TILE_FRACTION of the tiles fail, SlideReadError is raised.
    """
    import torch  # lazy: decode worker processes (use_processes) import this module, need no torch

    if batch_size < 1 or workers < 1:
        raise UsageError(f"batch size and workers must be ≥ 1 (got {batch_size}, {workers})")
    stats = stats if stats is not None else LoaderStats()
    if len(grid) == 0:
        return
    blocks = _block_plan(grid, max(1, block_tiles))
    origins = grid.origins_px
    workers = max(1, int(workers))
    executor, submit, owned_slide = _make_executor(slide, grid, workers, use_processes)
    pending: deque = deque()
    buf_imgs: list[np.ndarray] = []
    buf_idx: list[np.ndarray] = []
    buffered = 0
    try:
        block_iter = iter(blocks)
        for idx in block_iter:
            pending.append((idx, submit(origins[idx])))
            if len(pending) >= 2 * workers:
                break
        while pending:
            idx, fut = pending.popleft()
            nxt = next(block_iter, None)
            if nxt is not None:
                pending.append((nxt, submit(origins[nxt])))
            tiles, failed, err = fut.result()
            check_failures(stats, idx, failed=failed, error=err, n_tiles=len(grid))
            ok = ~failed
            buf_imgs.append(tiles[ok])
            buf_idx.append(idx[ok])
            buffered += int(ok.sum())
            while buffered >= batch_size or (not pending and buffered):
                imgs = np.concatenate(buf_imgs)
                ids = np.concatenate(buf_idx)
                take = min(batch_size, len(ids))
                stats.tiles += take
                yield TileBatch(torch.from_numpy(imgs[:take]), ids[:take], origins[ids[:take]])
                buf_imgs, buf_idx = [imgs[take:]], [ids[take:]]
                buffered -= take
    finally:
        for _, fut in pending:
            fut.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
        if owned_slide is not None:
            owned_slide.close()


def prefetch(batches: Iterator, depth: int = 2) -> Iterator:
    """Run the iterator `batches` on a background thread, `depth` items ahead: the device
    loader's host work (reading file tiles, queueing decodes) then overlaps the model's
    launches and the stitching. Its exceptions re-raise here, in order; closing this
    generator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in batches:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # re-raised in the consumer
            put((done, exc))
        finally:  # the source's own cleanup runs on its thread, before join() returns
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="tile-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _make_executor(slide, grid: TileGrid, workers: int, use_processes: bool):
    """Executor + submit(origins) for block reads; returns the slide it opened (to close)."""
    spec, ds = grid.spec, grid.downsample
    if use_processes:
        if not isinstance(slide, SlideRef):
            raise UsageError("worker processes need a SlideRef (path), not an open slide")
        # forkserver, not fork: the parent may hold CUDA, zarr's event-loop thread and
        # other threads that a forked child would inherit half-alive.
        executor: Executor = ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker, initargs=(slide,),
            mp_context=multiprocessing.get_context("forkserver"),
        )
        return executor, lambda o: executor.submit(_read_block_in_worker, o, spec, ds), None
    owned = slide.open() if isinstance(slide, SlideRef) else None
    target = owned if owned is not None else slide
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tilscore-read")
    return executor, lambda o: executor.submit(_read_block, target, o, spec, ds), owned

