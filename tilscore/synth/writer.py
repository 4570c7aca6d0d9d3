"""Synthetic whole slides with exact ground truth: pyramidal TIFF writer and truth files.

:func:`write_synthetic_slide` renders a :class:`~tilscore.synth_scene.SyntheticScene` tile by
tile into a tiled JPEG pyramidal TIFF (OpenSlide ``generic-tiff``; MPP in the TIFF resolution
tags, which both OpenSlide and tifffile read) and writes the truth beside it:

- ``OUT.tiff``: levels downsampled by 4 until the smallest side is < 1024 px (at least two
  levels). Level 0 is rendered tile by tile; each coarser level is the exact 4x4 area
  average of the level above (before JPEG), kept in a raw temporary file beside the output
  (1/16 of the level above), so memory stays bounded (one row of tiles) for any size.
- ``OUT.truth.json``: the tilscore ``summary.json`` keys with exact values (see
  :func:`tilscore.synth.truth.scene_truth`).
- ``OUT.truth.cells.csv``: one row per cell, streamed block row by block row.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from tilscore.errors import UsageError
from tilscore.synth.scene import SyntheticScene
from tilscore.synth.truth import scene_truth, write_cells_csv

log = logging.getLogger(__name__)

_MIN_LEVEL_SIDE_PX = 1024


@dataclass(frozen=True)
class SynthResult:
    """Paths written by :func:`write_synthetic_slide` and the truth dict (as in the JSON)."""

    slide_path: Path
    truth_path: Path
    cells_path: Path
    truth: dict


def write_synthetic_slide(out_path: str | Path, stain: str = "he", *, seed: int = 0,
                          size_px: tuple[int, int] = (8192, 8192), mpp: float = 0.25,
                          tile_px: int = 512, jpeg_quality: int = 90, workers: int | None = None,
                          **scene_knobs) -> SynthResult:
    """Write OUT.tiff, OUT.truth.json and OUT.truth.cells.csv for a synthetic slide.

    Args:
        out_path: output base path; a trailing ``.tiff``/``.tif`` is dropped.
        stain: "he", "cd20" or "foxp3". seed: layout seed (>= 0).
        size_px: (width, height) at level 0. mpp: µm per level-0 pixel.
        tile_px: TIFF tile side (multiple of 16). jpeg_quality: 1-100.
        workers: rendering threads (default: up to 4 CPUs).
        **scene_knobs: :class:`~tilscore.synth_scene.SceneParams` fields.

    Same arguments give byte-identical pixels and identical truth.
    """
    if tile_px % 16 or tile_px < 64:
        raise UsageError(f"tile_px must be a multiple of 16 and >= 64, got {tile_px}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise UsageError(f"jpeg_quality must be 1-100, got {jpeg_quality}")
    width_px, height_px = (int(v) for v in size_px)
    scene = SyntheticScene(width_px, height_px, mpp=mpp, stain=stain, seed=seed, **scene_knobs)
    base = Path(out_path)
    if base.suffix.lower() in (".tif", ".tiff"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    slide_path = base.parent / (base.name + ".tiff")
    truth_path = base.parent / (base.name + ".truth.json")
    cells_path = base.parent / (base.name + ".truth.cells.csv")
    if not workers:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(4, cpus or 1)
    t0 = time.perf_counter()
    write_pyramid_tiff(scene, slide_path, tile_px=tile_px, jpeg_quality=int(jpeg_quality),
                       workers=workers)
    t1 = time.perf_counter()
    counts = write_cells_csv(scene, cells_path)
    truth = scene_truth(scene, slide_path.stem, counts=counts)
    truth_path.write_text(json.dumps(truth, indent=2) + "\n")
    log.info("synthetic %s slide %s: %dx%d px, TIFF %.1f s, truth %.1f s", stain, slide_path,
             width_px, height_px, t1 - t0, time.perf_counter() - t1)
    return SynthResult(slide_path, truth_path, cells_path, truth)


# -- pyramidal TIFF ---------------------------------------------------------------------
def level_dimensions(width_px: int, height_px: int) -> list[tuple[int, int]]:
    """Level sizes: /4 (rounded up) until the smallest side < 1024 px; at least 2 levels."""
    dims = [(width_px, height_px)]
    while min(dims[-1]) >= _MIN_LEVEL_SIDE_PX or len(dims) < 2:
        w, h = dims[-1]
        if max(w, h) <= 1:
            break
        dims.append((max(1, -(-w // 4)), max(1, -(-h // 4))))
    return dims


class _RawLevel:
    """A level kept as raw uint8 RGB rows in a temporary file (appended band by band)."""

    def __init__(self, path: Path, width_px: int):
        self.path, self.width_px, self.rows = path, width_px, 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()

    def append(self, band: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(band).tobytes())
        self.rows += band.shape[0]

    def finish(self) -> None:
        self._file.close()

    def band(self, row0: int, rows: int, width_px: int) -> np.ndarray:
        """Rows [row0, row0+rows) as (rows, width_px, 3), white beyond the stored data."""
        out = np.full((rows, width_px, 3), 255, np.uint8)
        n = max(0, min(rows, self.rows - row0))
        if n:
            stored = np.fromfile(self.path, np.uint8, count=n * self.width_px * 3,
                                 offset=row0 * self.width_px * 3)
            stored = stored.reshape(n, self.width_px, 3)
            w = min(width_px, self.width_px)
            out[:n, :w] = stored[:, :w]
        return out


def _downsample4(tile: np.ndarray) -> np.ndarray:
    """4x4 area average of a uint8 (t, t, 3) tile (t % 4 == 0), rounded half up."""
    t = tile.shape[0]
    s = tile.reshape(t // 4, 4, t // 4, 4, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((s + 8) // 16).astype(np.uint8)


def _ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
    """fn over items in order, at most 2*workers in flight (bounded memory)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _level_tiles(read_tile: Callable, w: int, h: int, tile: int, sink: _RawLevel | None,
                 workers: int) -> Iterator[np.ndarray]:
    """Yield a level's tiles row-major; append their 4x4 averages to `sink` row by row."""
    cols, rows = -(-w // tile), -(-h // tile)
    band = np.empty((tile // 4, cols * tile // 4, 3), np.uint8) if sink else None
    for r in range(rows):
        for c, img in enumerate(_ordered_map(lambda cc, r=r: read_tile(r, cc),
                                             list(range(cols)), workers)):
            if sink is not None:
                band[:, c * tile // 4:(c + 1) * tile // 4] = _downsample4(img)
                if c == cols - 1:  # before the last yield: the consumer may stop there
                    sink.append(band)
            yield img


def write_pyramid_tiff(scene: SyntheticScene, path: Path, *, tile_px: int = 512,
                       jpeg_quality: int = 90, workers: int = 1) -> list[tuple[int, int]]:
    """Stream the scene into a tiled JPEG pyramidal TIFF; returns the level dimensions.

    JPEG tiles are YCbCr 4:2:0 inside the TIFF (photometric RGB in, converted by
    tifffile), which OpenSlide and tifffile decode identically. Resolution tags are
    pixels per centimetre (1e4 / mpp) at each level."""
    dims = level_dimensions(scene.width_px, scene.height_px)
    bigtiff = scene.width_px * scene.height_px * 3 > 2**32
    tile = tile_px

    def render_tile(r: int, c: int) -> np.ndarray:
        return scene.render(c * tile, r * tile, width=tile, height=tile)

    read_tile: Callable = render_tile
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as tmp, \
            tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for level, (w, h) in enumerate(dims):
            sink = None
            if level + 1 < len(dims):
                sink = _RawLevel(Path(tmp) / f"level{level + 1}.raw", -(-w // tile) * tile // 4)
            mpp_level = scene.mpp * scene.width_px / w
            tw.write(_level_tiles(read_tile, w, h, tile, sink, workers if level == 0 else 1),
                     shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": jpeg_quality},
                     resolution=(1e4 / mpp_level, 1e4 / mpp_level), resolutionunit="CENTIMETER",
                     subfiletype=0 if level == 0 else 1, metadata=None,
                     description=(f"tilscore synthetic slide stain={scene.stain} "
                                  f"seed={scene.seed} mpp={scene.mpp}") if level == 0 else None)
            if sink is not None:
                sink.finish()
                read_tile = _band_reader(sink, -(-dims[level + 1][0] // tile) * tile, tile)
            log.debug("wrote level %d (%dx%d)", level, w, h)
    return dims


def _band_reader(level: _RawLevel, width_px: int, tile: int) -> Callable:
    """read_tile(r, c) over a raw level, caching the current band (one row of tiles)."""
    cache: dict[int, np.ndarray] = {}

    def read_tile(r: int, c: int) -> np.ndarray:
        if r not in cache:
            cache.clear()
            cache[r] = level.band(r * tile, tile, width_px)
        return np.ascontiguousarray(cache[r][:, c * tile:(c + 1) * tile])

    return read_tile
