"""Inference engine: device choice, peak finding, tile seams, stitching, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tilscore.engine.infer import (
    Predictor,
    _decode_peaks,
    find_peaks,
    predict_slide,
    select_device,
    top_peaks,
)
from tilscore.errors import UsageError
from tilscore.models import ModelCard
from tilscore.prepare.tiles import TileSpec, tile_grid
from tilscore.slide import open_slide


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="valid: auto, cpu, cuda"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            select_device("cuda")
        with pytest.raises(UsageError, match="CUDA is not available"):
            select_device("cuda:1")


def test_find_peaks_positions_classes_and_core():
    heat = torch.zeros(1, 2, 40, 40)
    heat[0, 0, 10, 12] = 0.9  # class 0 peak at x=12, y=10
    heat[0, 1, 30, 5] = 0.8  # class 1 peak at x=5, y=30
    heat[0, 0, 30, 5] = 0.5  # weaker class-0 response at the same place: dropped
    heat[0, 0, 20, 20] = 0.2  # below threshold
    peaks = find_peaks(heat, 5, threshold=0.4)
    got = sorted(tuple(p) for p in peaks[:, 1:4].tolist())
    assert got == [(0.0, 12.5, 10.5), (1.0, 5.5, 30.5)]
    core_only = find_peaks(heat, 5, threshold=0.4, core=(8, 32))
    assert core_only[:, 1:4].tolist() == [[0.0, 12.5, 10.5]]


def test_top_peaks_equal_find_peaks_and_flag_a_full_tile():
    gen = torch.Generator().manual_seed(3)
    heat = torch.nn.functional.avg_pool2d(torch.rand(3, 2, 64, 64, generator=gen), 5, 1, 2)
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    exact = find_peaks(heat, 5, threshold=0.3, core=(4, 60)).numpy()
    assert len(exact) > 20
    score, index = top_peaks(heat, 5, threshold=0.3, core=(4, 60), k=256)
    assert np.array_equal(_decode_peaks(score.numpy(), index.numpy(), (64, 64)), exact)
    score, _ = top_peaks(heat, 5, threshold=0.3, core=(4, 60), k=4)  # fewer slots than peaks
    assert (score.numpy() >= 0).all(axis=1).all()  # every tile flagged as possibly cut


class DarkBlobNet(nn.Module):
    """A hand-set network (no training): region logits favour 'stroma' everywhere; the
    lymphocyte heatmap is a smoothed darkness map, so dark discs give one peak each."""

    def __init__(self):
        super().__init__()
        k = torch.arange(-4, 5, dtype=torch.float32)
        g = torch.exp(-(k[:, None] ** 2 + k[None] ** 2) / (2 * 2.0**2))
        self.register_buffer("kernel", (g / g.sum())[None, None])

    def forward(self, x):
        dark = 1.0 - x.float().mean(dim=1, keepdim=True) / 255.0
        smooth = nn.functional.conv2d(dark, self.kernel, padding=4)
        heat = 40.0 * (smooth - 0.5)
        b, _, h, w = x.shape
        regions = torch.zeros(b, 4, h, w, device=x.device)
        regions[:, 2] = 5.0
        return torch.cat([regions, heat, torch.full_like(heat, -20.0), heat], dim=1)


def _card():
    return ModelCard(name="hand", architecture="unet-resnet18", input_mpp=0.5, tile_px=96,
                     overlap_px=16)


def _disc_image(centres, size=(400, 400), r=4):
    img = np.full((*size, 3), 230, np.uint8)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    for cx, cy in centres:
        img[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r] = 20
    return img


@pytest.mark.parametrize("workers,cap", [(1, None), (2, None), (2, 1)])
def test_cell_on_tile_seam_is_reported_once(tmp_path, workers, cap):
    card = _card()
    core = card.tile_px - 2 * card.overlap_px  # 64
    # Cells exactly on core boundaries (x = 128 is the edge between cores 1 and 2), on a
    # corner where four cores meet, and inside a core.
    centres = [(128.0, 100.0), (192.0, 192.0), (100.0, 40.0)]
    slide = open_slide(_disc_image(centres), mpp=0.5)
    spec = TileSpec(mpp=0.5, tile_px=card.tile_px, overlap_px=card.overlap_px)
    grid = tile_grid(slide.dimensions, slide.mpp, spec=spec)
    predictor = Predictor(DarkBlobNet(), card, torch.device("cpu"), region_factor=4)
    if cap is not None:  # every tile with a cell fills its peak slots: exact fallback
        predictor.max_peaks_per_tile = cap
    pred = predict_slide(slide, grid, predictor=predictor, store_path=tmp_path / "c.zarr",
                         workers=workers,
                         batch_size=3)
    xy = np.stack([pred.cells["x_px"], pred.cells["y_px"]], 1)
    assert len(xy) == len(centres)
    for c in centres:
        assert np.min(np.hypot(*(xy - c).T)) <= 1.0
    assert core == 64
    labels = pred.canvas.labels[:]
    assert labels.shape == (grid.n_rows * 16, grid.n_cols * 16)
    assert (labels == 2).all()  # every core written: no seams, no gaps


def test_predictions_are_deterministic_on_cpu(tmp_path):
    from tilscore.models import create_model

    torch.manual_seed(0)
    card = ModelCard(name="r", architecture="unet-resnet18", input_mpp=0.5, tile_px=128,
                     overlap_px=16, architecture_kwargs={"decoder_channels": [32, 16, 16, 8, 8]},
                     heatmap={"threshold": 0.5})
    net = create_model(card.architecture, card.out_channels, **card.architecture_kwargs).eval()
    img = np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    slide = open_slide(img, mpp=0.5)
    grid = tile_grid(slide.dimensions, 0.5, spec=TileSpec(0.5, 128, 16))
    runs = []
    for k in range(2):
        pred = predict_slide(slide, grid, predictor=Predictor(net, card, torch.device("cpu")),
                             store_path=tmp_path / f"{k}.zarr", workers=2)
        runs.append((pred.cells, pred.canvas.labels[:]))
    for key in runs[0][0]:
        assert np.array_equal(runs[0][0][key], runs[1][0][key])
    assert np.array_equal(runs[0][1], runs[1][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    card = _card()
    centres = [(128.0, 100.0), (60.0, 60.0)]
    slide = open_slide(_disc_image(centres), mpp=0.5)
    grid = tile_grid(slide.dimensions, 0.5, spec=TileSpec(0.5, card.tile_px, card.overlap_px))
    out = {}
    for dev in ("cpu", "cuda"):
        pred = predict_slide(slide, grid, predictor=Predictor(DarkBlobNet(), card,
                                                              torch.device(dev)),
                             store_path=tmp_path / f"{dev}.zarr")
        out[dev] = np.stack([pred.cells["x_px"], pred.cells["y_px"]], 1)
    assert len(out["cpu"]) == len(out["cuda"]) == 2
    assert np.abs(np.sort(out["cpu"], 0) - np.sort(out["cuda"], 0)).max() <= 1.0


def test_failed_slide_leaves_no_canvas_write_running(tmp_path):
    """A failure mid-slide stops the canvas's background writer before predict_slide
    returns, so the caller can delete the work folder with nothing still writing."""
    import threading

    card = _card()
    slide = open_slide(_disc_image([(40.0, 40.0)]), mpp=0.5)
    grid = tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(0.5, card.tile_px, card.overlap_px))

    class Boom(DarkBlobNet):
        calls = 0

        def forward(self, x):
            Boom.calls += 1
            if Boom.calls == 31:  # after the first band (4 rows of 7 tiles) is stored
                raise RuntimeError("boom")
            return super().forward(x)

    with pytest.raises(RuntimeError, match="boom"):
        predict_slide(slide, grid, predictor=Predictor(Boom(), card, torch.device("cpu")),
                      store_path=tmp_path / "c.zarr", batch_size=1)
    assert not [t for t in threading.enumerate() if t.name.startswith("canvas")]


def test_bf16_only_where_native_and_float32_on_request(monkeypatch):
    """bf16 autocast on a CPU only when it has AVX512-BF16 or AMX (else oneDNN emulates
    it, slower than float32); TILSCORE_FLOAT32=1 turns it off everywhere."""
    from tilscore.engine.infer import bf16_is_native

    cpu = torch.device("cpu")
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.delenv("TILSCORE_FLOAT32", raising=False)
    assert bf16_is_native(cpu) is bool(native)
    monkeypatch.setenv("TILSCORE_FLOAT32", "1")
    assert bf16_is_native(cpu) is False
    monkeypatch.setenv("TILSCORE_FLOAT32", "0")
    assert bf16_is_native(cpu) is bool(native)


def _seam_prediction(tmp_path, device: str, compile_model, cap=None, name="c"):
    """predict_slide on the seam image of the test above (49 tiles in batches of 3: the
    last batch is short)."""
    card = _card()
    slide = open_slide(_disc_image([(128.0, 100.0), (192.0, 192.0), (100.0, 40.0)]),
                       mpp=0.5)
    grid = tile_grid(slide.dimensions, 0.5, spec=TileSpec(0.5, card.tile_px, card.overlap_px))
    predictor = Predictor(DarkBlobNet(), card, torch.device(device), region_factor=4,
                          compile_model=compile_model)
    if cap is not None:
        predictor.max_peaks_per_tile = cap
    pred = predict_slide(slide, grid, predictor=predictor, store_path=tmp_path / f"{name}.zarr",
                         batch_size=3)
    assert len(grid) % 3 != 0  # a short last batch (padded when compiled)
    return pred


def test_compiled_predictor_equals_eager(tmp_path):
    """torch.compile of the forward pass and its decoding (one batch shape; the short last
    batch is padded) gives the eager cells, focus and region labels."""
    eager = _seam_prediction(tmp_path, "cpu", False, name="e")
    compiled = _seam_prediction(tmp_path, "cpu", True, name="k")
    assert len(eager.cells["x_px"]) == 3
    for key in eager.cells:
        assert np.array_equal(eager.cells[key], compiled.cells[key])
    assert np.array_equal(eager.canvas.labels[:], compiled.canvas.labels[:])
    assert np.allclose(eager.focus, compiled.focus, equal_nan=True, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cap", [None, 1])
def test_cuda_graphs_equal_eager(tmp_path, cap):
    """CUDA graphs (torch.compile mode reduce-overhead): each replay overwrites the last
    outputs, so results must be copied out in time, and the heatmaps kept for the exact
    fallback (cap 1: every tile with a cell takes it) must survive the next replay."""
    eager = _seam_prediction(tmp_path, "cuda", False, cap, name="e")
    graphs = _seam_prediction(tmp_path, "cuda", "reduce-overhead", cap, name="g")
    for key in eager.cells:
        assert np.array_equal(eager.cells[key], graphs.cells[key])
    assert np.array_equal(eager.canvas.labels[:], graphs.canvas.labels[:])
