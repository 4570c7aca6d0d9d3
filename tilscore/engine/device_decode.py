"""Tiles decoded on the model's device: raw JPEG file tiles in, uint8 model tiles out.

On a GPU node the CPU loader (:func:`tilscore.tiles.iter_tile_batches`) tops out near
300 model tiles/s on 16 cores (docs/benchmarks.md): decoding, resampling and assembling
1024² level-0 pixels per model tile is CPU work. Here the host only reads the compressed
bytes of the file tiles a block of model tiles needs (``os.pread``, a few hundred kB per
model tile, no decoding); nvJPEG decodes them on the GPU in one batched call
(``torchvision.io.decode_jpeg``), and the GPU assembles the block, crops the model tiles
and area-averages them to the model mpp. The same code runs on CPU (libjpeg-turbo), which
is how CI checks it against the CPU loader.

Eligible slides: a TIFF that tifffile reads (generic/OME TIFF, Aperio SVS, ...) whose
chosen pyramid level is tiled, 8-bit RGB, JPEG-compressed (YCbCr; RGB-coded Aperio JPEG
gets an Adobe marker so decoders keep it RGB), and whose model mpp is an integer multiple
of that level's mpp. Anything else uses the CPU loader (:func:`device_tile_reader` returns
None and says why in the log).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import InitVar, dataclass

import numpy as np
import tifffile
import torch
import torch.nn.functional as F

from tilscore.prepare.tiles import LoaderStats, TileBatch, _block_plan, _read_block, check_failures

log = logging.getLogger(__name__)

JPEG = 7  # TIFF compression tag value
YCBCR, RGB = 6, 2  # TIFF photometric values
# Adobe APP14 segment, transform 0: the three components are RGB, not YCbCr.
_ADOBE_RGB = bytes.fromhex("ffee000e41646f626500640000000000")


@dataclass
class DeviceTileReader:
    """One pyramid level's JPEG file tiles. ``factor``: level px per model px (integer);
    ``level_ds``: level-0 px per level px."""

    path: str
    page: InitVar[object]  # tifffile page of the level (tiled, JPEG); read here, not kept
    factor: int
    level_ds: float

    def __post_init__(self, p):
        self.tile_w, self.tile_h = int(p.tilewidth), int(p.tilelength)
        self.width, self.height = int(p.imagewidth), int(p.imagelength)
        self.n_tx = -(-self.width // self.tile_w)
        self.n_ty = -(-self.height // self.tile_h)
        self.offsets = np.asarray(p.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(p.databytecounts, dtype=np.int64)
        tables = p.jpegtables
        self.tables = bytes(tables[:-2]) if tables else b""  # without its EOI
        self.adobe = _ADOBE_RGB if p.photometric == RGB else b""
        self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def stream(self, index: int) -> bytes | None:
        """File tile `index` (raster order) as a complete JPEG stream; None when the
        file stores no data for it (a sparse tile: white)."""
        n = int(self.counts[index])
        if n == 0:
            return None
        data = os.pread(self.fd, n, int(self.offsets[index]))
        if not self.tables and not self.adobe:
            return data
        # SOI + tables (quantisation/Huffman, shared in the TIFF tag) + the tile's own
        # segments after its SOI: the usual abbreviated-stream splice.
        head = self.tables if self.tables else data[:2]
        return head[:2] + self.adobe + head[2:] + data[2:]

    def read_region(self, lx: int, ly: int, *, lw: int, lh: int, device):
        """uint8 (3, lh, lw) on `device`: level px [lx, lx+lw) x [ly, ly+lh), white
        outside the level."""
        # lazy: torchvision (~2 s) only for JPEG decoding on the device
        from torchvision.io import ImageReadMode, decode_jpeg

        out = torch.full((3, lh, lw), 255, dtype=torch.uint8, device=device)
        tx0, ty0 = max(0, lx // self.tile_w), max(0, ly // self.tile_h)
        tx1 = min(self.n_tx, -(-(lx + lw) // self.tile_w))
        ty1 = min(self.n_ty, -(-(ly + lh) // self.tile_h))
        where, data = [], []
        for ty in range(ty0, ty1):
            for tx in range(tx0, tx1):
                s = self.stream(ty * self.n_tx + tx)
                if s is not None:
                    where.append((tx, ty))
                    data.append(torch.frombuffer(bytearray(s), dtype=torch.uint8))
        if not data:
            return out
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        for (tx, ty), img in zip(where, images, strict=True):
            x0, y0 = tx * self.tile_w, ty * self.tile_h
            # The tile's valid part (edge tiles are padded in the file), clipped to the region.
            ax0, ay0 = max(x0, lx), max(y0, ly)
            ax1 = min(x0 + self.tile_w, self.width, lx + lw)
            ay1 = min(y0 + self.tile_h, self.height, ly + lh)
            out[:, ay0 - ly : ay1 - ly, ax0 - lx : ax1 - lx] = img[
                :, ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]
        return out


def device_tile_reader(slide, grid) -> DeviceTileReader | None:
    """A reader for `slide` (an open :class:`~tilscore.slide.base.Slide`) at the grid's
    mpp, or None when the slide is not eligible (see the module docstring)."""
    ds = grid.downsample
    level = slide.best_level(ds)
    level_ds = slide.level_downsamples[level]
    factor = ds / level_ds
    if abs(factor - round(factor)) > 1e-3:
        log.info("device decoding off: %.4f level px per model px is not an integer", factor)
        return None
    try:
        tif = tifffile.TiffFile(slide.path)
    except Exception as exc:  # not a TIFF tifffile can parse
        log.info("device decoding off: %s", exc)
        return None
    try:
        want = tuple(slide.level_dimensions[level])
        pages = [lv.keyframe for lv in tif.series[0].levels] if tif.series else []
        page = next((p for p in pages if (p.imagewidth, p.imagelength) == want), None)
        ok = (page is not None and page.is_tiled and page.compression == JPEG
              and page.photometric in (YCBCR, RGB) and page.samplesperpixel == 3
              and page.bitspersample == 8 and page.planarconfig == 1)
        if not ok:
            log.info("device decoding off: level %d is not tiled 8-bit RGB JPEG", level)
            return None
        reader = DeviceTileReader(str(slide.path), page, int(round(factor)), level_ds)
    finally:
        tif.close()
    return reader


def iter_device_batches(reader: DeviceTileReader, slide, *, grid, device, batch_size: int,
                        block_tiles: int = 4, stats=None) -> Iterator:
    """Like :func:`tilscore.tiles.iter_tile_batches`, with the images already on `device`
    (uint8 NHWC, channels_last once permuted): blocks of ≤ block_tiles² neighbouring model
    tiles are decoded and assembled at once. A block whose JPEG data fails to decode is
    read again by `slide` on the host, tile by tile, so a corrupt file tile costs only the
    model tiles that touch it (the CPU loader's rule, with its failure limit)."""
    stats = stats if stats is not None else LoaderStats()
    origins = grid.origins_px
    buf_imgs: list = []
    buf_idx: list[np.ndarray] = []
    buffered = 0
    blocks = _block_plan(grid, block_tiles)
    for n, idx in enumerate(blocks):
        try:
            crops = _device_block(reader, grid, origins[idx], device)
        except RuntimeError as exc:  # torchvision raises RuntimeError on corrupt JPEG data
            log.warning("device decoding failed (%s); reading the block on the host", exc)
            tiles, failed, err = _read_block(slide, origins[idx], grid.spec, grid.downsample)
            check_failures(stats, idx, failed=failed, error=err, n_tiles=len(grid))
            idx = idx[~failed]
            crops = torch.from_numpy(tiles[~failed]).to(device)
        buf_imgs.append(crops)
        buf_idx.append(idx)
        buffered += len(idx)
        last = n == len(blocks) - 1
        while buffered >= batch_size or (last and buffered):
            imgs = torch.cat(buf_imgs) if len(buf_imgs) > 1 else buf_imgs[0]
            ids = np.concatenate(buf_idx)
            take = min(batch_size, len(ids))
            stats.tiles += take
            yield TileBatch(imgs[:take], ids[:take], origins[ids[:take]])
            buf_imgs, buf_idx = [imgs[take:]], [ids[take:]]
            buffered -= take


def _device_block(reader: DeviceTileReader, grid, o: np.ndarray, device):
    """uint8 (n, tile, tile, 3) on `device` (NHWC, channels_last memory) for the model
    tiles at grid px origins `o` (n, 2)."""
    t, f, ds = grid.spec.tile_px, reader.factor, grid.downsample
    x0, y0 = o.min(axis=0)
    x1, y1 = o.max(axis=0) + t
    # grid px → level px: × ds (level-0 px) ÷ level_ds; exact, since ds / level_ds = f.
    lx, ly = int(round(x0 * ds / reader.level_ds)), int(round(y0 * ds / reader.level_ds))
    region = reader.read_region(lx, ly, lw=int(x1 - x0) * f, lh=int(y1 - y0) * f, device=device)
    crops = torch.stack([region[:, (oy - y0) * f : (oy - y0 + t) * f,
                                (ox - x0) * f : (ox - x0 + t) * f] for ox, oy in o])
    if f > 1:  # area averaging, as Slide.read does (cv2 INTER_AREA) for integer factors
        crops = F.avg_pool2d(crops.float(), f).round_().to(torch.uint8)
    return crops.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
