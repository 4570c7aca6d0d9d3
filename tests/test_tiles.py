"""Tile grid geometry and the streaming loader."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tilscore.errors import SlideReadError, UsageError
from tilscore.prepare.tiles import (
    LoaderStats,
    SlideRef,
    TileSpec,
    iter_tile_batches,
    tile_grid,
)
from tilscore.prepare.tissue import TissueMask
from tilscore.slide import open_slide


def _noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_cores_tile_the_slide_exactly():
    spec = TileSpec(mpp=0.5, tile_px=128, overlap_px=16)
    grid = tile_grid((1000, 700), 0.25, spec=spec)  # downsample 2: 500 x 350 grid px
    core = spec.core_px
    assert grid.n_cols == int(np.ceil(500 / core)) and grid.n_rows == int(np.ceil(350 / core))
    cover = np.zeros((grid.n_rows * core, grid.n_cols * core), dtype=np.int32)
    for (x, y) in grid.origins_px:
        cx, cy = x + spec.overlap_px, y + spec.overlap_px
        cover[cy : cy + core, cx : cx + core] += 1
    assert (cover == 1).all()  # every grid pixel in exactly one core
    assert np.allclose(grid.origins_l0, grid.origins_px * 2.0)


def test_tissue_selects_tiles():
    mask = np.zeros((40, 40), dtype=bool)
    mask[:, :10] = True  # tissue only in the left quarter (8 µm px → 80 µm)
    spec = TileSpec(mpp=0.5, tile_px=96, overlap_px=8)  # core 80 px = 40 µm
    grid = tile_grid((1280, 1280), 0.25, spec=spec, mask=TissueMask(mask, mpp=8.0))
    assert set(grid.cols.tolist()) == {0, 1}
    assert len(grid) == 2 * grid.n_rows


def test_bad_spec_is_usage_error():
    with pytest.raises(UsageError):
        TileSpec(mpp=0.5, tile_px=64, overlap_px=32)


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_yields_every_tile_once_with_exact_pixels(workers):
    img = _noise_image(900, 1100)
    slide = open_slide(img, mpp=0.5)
    spec = TileSpec(mpp=0.5, tile_px=128, overlap_px=16)
    grid = tile_grid(slide.dimensions, slide.mpp, spec=spec)
    stats = LoaderStats()
    seen = []
    for batch in iter_tile_batches(slide, grid, batch_size=5, workers=workers, block_tiles=3,
                                   stats=stats):
        assert batch.images.shape[1:] == (128, 128, 3) and len(batch.images) <= 5
        for k, tile, (x, y) in zip(batch.index, batch.images.numpy(), batch.origins_px,
                                   strict=True):
            # ds = 1: exact
            assert np.array_equal(tile, slide.read(int(x), int(y), width=128, height=128))
            seen.append(int(k))
    assert sorted(seen) == list(range(len(grid)))
    # Block order, the same whatever the number of workers.
    again = [int(k) for b in iter_tile_batches(slide, grid, batch_size=3, workers=1,
                                               block_tiles=3) for k in b.index]
    assert seen == again
    assert stats.tiles == len(grid) and not stats.failed_tiles


def test_loader_downsampled_tiles_match_direct_reads():
    img = _noise_image(1024, 1024, seed=1)
    slide = open_slide(img, mpp=0.25)
    spec = TileSpec(mpp=0.5, tile_px=64, overlap_px=8)
    grid = tile_grid(slide.dimensions, slide.mpp, spec=spec)
    batches = list(iter_tile_batches(slide, grid, batch_size=8, workers=2))
    for batch in batches:
        for tile, (x, y) in zip(batch.images.numpy(), batch.origins_px, strict=True):
            direct = slide.read(int(x * 2), int(y * 2), width=64, height=64, mpp=0.5)
            assert np.abs(tile.astype(int) - direct).mean() < 1.0


def test_edge_tiles_are_padded_white():
    slide = open_slide(np.zeros((100, 100, 3), dtype=np.uint8), mpp=0.5)
    spec = TileSpec(mpp=0.5, tile_px=64, overlap_px=8)
    grid = tile_grid(slide.dimensions, slide.mpp, spec=spec)
    first = next(iter_tile_batches(slide, grid, batch_size=1, workers=1)).images[0].numpy()
    assert (first[:8] == 255).all() and (first[:, :8] == 255).all()  # context outside slide
    assert (first[8:, 8:] == 0).all()


def _write_tiled_tiff(path, img, tile=64):
    tifffile.imwrite(path, img, tile=(tile, tile), photometric="rgb", compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")


def test_loader_in_worker_processes(tmp_path):
    img = _noise_image(512, 512, seed=3)
    path = tmp_path / "noise.tiff"
    _write_tiled_tiff(path, img)
    spec = TileSpec(mpp=0.5, tile_px=96, overlap_px=8)
    grid = tile_grid((512, 512), 0.5, spec=spec)
    got = {}
    for batch in iter_tile_batches(SlideRef(str(path)), grid, batch_size=4, workers=2,
                                   use_processes=True):
        for k, tile in zip(batch.index, batch.images.numpy(), strict=True):
            got[int(k)] = tile
    assert len(got) == len(grid)
    with open_slide(path) as slide:
        x, y = grid.origins_px[3]
        assert np.array_equal(got[3], slide.read(int(x), int(y), width=96, height=96))


def _corrupt_tile(path, tile_index: int) -> None:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[tile_index], page.databytecounts[tile_index]
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff" * count)


def test_corrupt_file_tile_loses_only_its_tiles(tmp_path):
    path = tmp_path / "corrupt.tiff"
    _write_tiled_tiff(path, _noise_image(2048, 2048, seed=4), tile=64)
    _corrupt_tile(path, 5)  # file tile (row 0, col 5): 1 of 1024 file tiles
    spec = TileSpec(mpp=0.5, tile_px=64, overlap_px=0)
    grid = tile_grid((2048, 2048), 0.5, spec=spec)
    stats = LoaderStats()
    n = sum(len(b.index) for b in iter_tile_batches(SlideRef(str(path)), grid, batch_size=64,
                                                    workers=2, stats=stats))
    assert stats.failed_tiles == [5]
    assert n == len(grid) - 1


def test_mostly_corrupt_slide_fails(tmp_path):
    path = tmp_path / "bad.tiff"
    _write_tiled_tiff(path, _noise_image(256, 256, seed=5), tile=64)
    for k in range(16):
        _corrupt_tile(path, k)
    grid = tile_grid((256, 256), 0.5, spec=TileSpec(mpp=0.5, tile_px=64, overlap_px=0))
    with pytest.raises(SlideReadError, match="tiles failed to decode"):
        list(iter_tile_batches(SlideRef(str(path)), grid, batch_size=16, workers=1))


def test_prefetch_keeps_order_reraises_and_stops_its_source():
    from tilscore.prepare.tiles import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))
    closed = []

    def source():
        try:
            yield 1
            yield 2
            raise ValueError("bad tile")
        finally:
            closed.append(True)

    it = prefetch(source())
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ValueError, match="bad tile"):
        next(it)
    assert closed == [True]
    endless = prefetch(iter(lambda: 0, 1), depth=3)  # never ends by itself
    assert next(endless) == 0
    endless.close()  # returns: the thread stopped
