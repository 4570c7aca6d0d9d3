"""JPEG file tiles decoded on the model's device (tilscore.engine.device_decode): the same tiles
as the CPU loader, on CPU here (libjpeg-turbo through torchvision) and on CUDA (nvJPEG)
under the gpu marker; ineligible slides fall back; corrupt tiles follow the loader's rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import shared_path
from tilscore.engine.device_decode import device_tile_reader, iter_device_batches
from tilscore.errors import SlideReadError
from tilscore.models.registry import MODELS_DIR
from tilscore.prepare.tiles import TileSpec, iter_tile_batches, tile_grid
from tilscore.slide import open_slide

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from tilscore.synth.writer import write_synthetic_slide

    path = tmp_path_factory.mktemp("dd") / "s.tiff"
    return write_synthetic_slide(path, stain="he", seed=3, size_px=(2304, 1792),
                                 mpp=0.25).slide_path


def _both(slide, grid, device):
    reader = device_tile_reader(slide, grid)
    assert reader is not None
    try:
        dev = list(iter_device_batches(reader, slide, grid=grid, device=device, batch_size=5))
    finally:
        reader.close()
    host = list(iter_tile_batches(slide, grid, batch_size=5, workers=2))
    order = [np.concatenate([b.index for b in bs]) for bs in (dev, host)]
    assert (order[0] == order[1]).all()
    assert [len(b.index) for b in dev] == [len(b.index) for b in host]
    a = torch.cat([b.images.cpu() for b in dev]).numpy().astype(np.int16)
    b = torch.cat([b.images for b in host]).numpy().astype(np.int16)
    assert a.shape == b.shape
    return np.abs(a - b), reader


@pytest.mark.parametrize("mpp,factor,level_ds", [(0.5, 2, 1.0), (2.0, 2, 4.0), (1.0, 1, 4.0)])
def test_device_tiles_equal_the_cpu_loader(synthetic, mpp, factor, level_ds):
    """Level 0 pooled 2x (0.5 µm/px), level 1 pooled 2x (2 µm/px) and level 1 as is, with
    tiles past the slide's right and bottom edges (white) in each case."""
    with open_slide(synthetic) as slide:
        grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(mpp, 256, 16))
        diff, reader = _both(slide, grid, torch.device("cpu"))
    assert (reader.factor, reader.level_ds) == (factor, level_ds)
    assert diff.max() <= 1 and diff.mean() < 0.2  # rounding of the 2 x 2 means only


def test_aperio_rgb_jpeg_with_shared_tables_decodes_like_openslide():
    """Aperio tiles are abbreviated JPEG streams (tables in a TIFF tag) coded as RGB, not
    YCbCr: the splice and the Adobe marker must give OpenSlide's pixels."""
    path = shared_path("slides/CMU-1-Small-Region.svs")
    with open_slide(path, mpp=0.25) as slide:  # 0.499 → 0.25 so 0.5 is an integer factor
        grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(0.5, 256, 16))
        diff, reader = _both(slide, grid, torch.device("cpu"))
    assert reader.tables and reader.adobe
    assert diff.max() <= 1


def test_ineligible_slides_use_the_cpu_loader(synthetic, tmp_path):
    img = np.full((300, 300, 3), 200, np.uint8)
    with open_slide(img, mpp=0.5) as slide:  # not a file
        assert device_tile_reader(slide, tile_grid(slide.dimensions, 0.5,
                                                   spec=TileSpec(0.5, 128, 16))) is None
    with open_slide(synthetic) as slide:  # 0.6 / 0.25 = 2.4 level px per model px
        grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(0.6, 256, 16))
        assert device_tile_reader(slide, grid) is None


def test_corrupt_jpeg_tile_is_retried_on_the_host_and_counted_as_failed():
    from tilscore.engine.infer import Predictor, predict_slide
    from tilscore.models.card import ModelCard
    from tilscore.models.registry import create_model

    card = ModelCard(name="t", architecture="unet-resnet18", input_mpp=0.5, tile_px=64,
                     overlap_px=8, architecture_kwargs={"decoder_channels": [16, 8, 8, 8, 8]})
    net = create_model(card.architecture, card.out_channels, **card.architecture_kwargs)
    predictor = Predictor(net.eval(), card, torch.device("cpu"))
    with open_slide(shared_path("slides/unreadable.svs"), mpp=0.5) as slide:
        grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(0.5, 64, 8))
        assert device_tile_reader(slide, grid) is not None
        got = {d: predict_slide(slide, grid, predictor=predictor, store_path="memory://", decode=d)
               for d in ("device", "host")}
    # One corrupt tile is within the loader's 5 % allowance (at least one tile): skipped,
    # counted, and the same on both paths.
    assert [(p.tiles, p.failed_tiles) for p in got.values()] == [(0, 1), (0, 1)]


def test_too_many_corrupt_tiles_fail_the_slide(synthetic, tmp_path):
    """More than 5 % of the tiles undecodable: SlideReadError, as with the CPU loader."""
    import shutil

    import tifffile

    bad = tmp_path / "bad.tiff"
    shutil.copy(synthetic, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    with open(bad, "r+b") as fh:  # overwrite every level-0 tile's header segments
        for offset, _ in spans:
            fh.seek(offset + 2)
            fh.write(b"\xff\xdb\x00\x01")
    with open_slide(bad) as slide:
        grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(0.5, 256, 16))
        reader = device_tile_reader(slide, grid)
        with pytest.raises(SlideReadError, match="tiles failed to decode"):
            list(iter_device_batches(reader, slide, grid=grid, device=torch.device("cpu"),
                                     batch_size=32))
        reader.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_tiles_equal_the_cpu_loader(synthetic):
    with open_slide(synthetic) as slide:
        grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(0.5, 256, 16))
        diff, _ = _both(slide, grid, torch.device("cuda"))
    # nvJPEG upsamples chroma differently (H100: mean 0.35, 99.9th percentile 6 levels)
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 8


@pytest.mark.skipif(not (MODELS_DIR / "he-default" / "card.json").exists(),
                    reason="shipped model models/he-default missing")
def test_engine_with_device_decoding_matches_host_decoding(synthetic, tmp_path):
    """predict_slide end to end (prefetch thread, background band writes) with the shipped
    model: the same cells and regions whichever side decodes."""
    from tilscore.engine.infer import Predictor, predict_slide
    from tilscore.models import load_model

    net, card = load_model("he-default")
    predictor = Predictor(net, card, torch.device("cpu"))
    with open_slide(synthetic) as slide:
        grid = tile_grid(slide.dimensions, slide.mpp,
                         spec=TileSpec(card.input_mpp, card.tile_px, card.overlap_px))
        got = {d: predict_slide(slide, grid, predictor=predictor,
                                store_path=tmp_path / f"{d}.zarr", decode=d)
               for d in ("device", "host")}
    dev, host = got["device"], got["host"]
    assert dev.tiles == host.tiles == len(grid)
    n_dev, n_host = len(dev.cells["x_px"]), len(host.cells["x_px"])
    assert n_host > 100 and abs(n_dev - n_host) <= 0.01 * n_host
    agree = (dev.canvas.labels[:] == host.canvas.labels[:]).mean()
    assert agree > 0.995
