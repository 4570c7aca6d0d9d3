#!/usr/bin/env python
"""TIAToolbox's SemanticSegmentor engine on a synthetic slide, with one of two networks.

Runs in TIAToolbox's own virtual environment (it brings its own torch), never imported by
tilscore, and imports nothing from tilscore.

``--arch bcss`` (default; product-to-product anchor): TIAToolbox's BCSS-architecture U-Net
with random weights (the architecture is what costs time; nothing is downloaded),
``UNetModel(3, 3, encoder="resnet50", decoder_block=[3, 3])``, 1024² patches at
0.5 µm/px, 512² outputs, stride 512.

``--arch tilscore`` (same network in both engines): tilscore's model (default
``models/he-default``: smp Unet, rebuilt here from card.json, weights from
weights.safetensors), tiled as tilscore tiles it: ``tile_px`` patches at ``input_mpp``
with ``overlap_px`` cropped on each side (he-default: 512² in, 448² out, stride 448 at
0.5 µm/px). Normalisation, channels_last, uint8 host-to-device copies and bf16 autocast
on CUDA follow tilscore's Predictor; TIAToolbox merges and saves the softmax of the region
logits (4 channels for he-default).

Usage:
  python3 -m venv /tmp/tia-venv && /tmp/tia-venv/bin/pip install tiatoolbox \
      segmentation-models-pytorch==0.6.0   # smp only for --arch tilscore
  /tmp/tia-venv/bin/python scripts/bench_tiatoolbox.py SLIDE [--arch tilscore]
      [--device cpu|cuda] [--batch-size 4] [--workers 2] [--reader auto|openslide]
      [--compile default|disable|...]
Prints one JSON line: seconds, peak RSS (VmHWM), patches, parameters, ...

Slide reader: ``--reader auto`` (default) is TIAToolbox's own choice. For tilscore's
synthetic slides (generic tiled JPEG TIFF) its TIFFWSIReader declines ("Unsupported TIFF
WSI format") and it falls back to VirtualWSIReader, which decodes the whole level 0 into
memory with cv2.imread, in the main process and again in each loader worker (VmHWM below
is the main process only). ``--reader openslide`` makes WSIReader.open (main process and
forked workers) skip TIFFWSIReader and read .tif/.tiff through OpenSlide, tile by tile.
Where SimpleITK or imagecodecs is not installed, the script stands in empty modules for
them: TIAToolbox imports both at start-up, and neither is used with either reader on
these slides. The JSON's "stubbed" lists them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



def tilscore_architectures() -> dict[str, tuple[str, dict]]:
    """tilscore's architecture table, read by path: importing the tilscore package would
    need its dependencies (pydantic, ...) in TIAToolbox's environment."""
    path = REPO / "tilscore" / "models" / "architectures.py"
    spec = importlib.util.spec_from_file_location("tilscore_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ARCHITECTURES


def stub_missing(names: list[str]) -> list[str]:
    """Put empty stand-in modules into sys.modules for `names` that are not installed."""
    stubbed = []
    for name in names:
        top = name.split(".")[0]
        if top not in stubbed and importlib.util.find_spec(top) is not None:
            continue
        mod = types.ModuleType(name)

        def __getattr__(attr, _name=name):  # noqa: N807
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {"__module__": _name})

        mod.__getattr__ = __getattr__
        mod.__path__ = []  # a package, so that submodules can be stubbed too
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, mod)
        stubbed.append(name)
    return stubbed


def force_openslide_reader() -> None:
    """WSIReader.open on .tif/.tiff: skip TIFFWSIReader, fall through to OpenSlide.
    Inherited by forked loader workers, which re-open the slide by path."""
    from tiatoolbox.wsicore.wsireader import WSIReader

    WSIReader.try_tiff = staticmethod(lambda *a, **k: None)


def build_bcss():
    from tiatoolbox.models.architecture.unet import UNetModel

    return UNetModel(3, 3, encoder="resnet50", decoder_block=[3, 3]), None


def build_tilscore(model_dir: Path, random_weights: bool = False):
    """tilscore's network as a TIAToolbox ModelABC; returns (model, card dict)."""
    import segmentation_models_pytorch as smp
    import torch
    import torch.nn.functional as F  # noqa: N812
    from safetensors.torch import load_file
    from tiatoolbox.models.architecture.utils import argmax_last_axis
    from tiatoolbox.models.models_abc import ModelABC

    card = json.loads((model_dir / "card.json").read_text())
    cls_name, defaults = tilscore_architectures()[card["architecture"]]
    params = {**defaults, **card.get("architecture_kwargs", {})}
    if "decoder_channels" in params:
        params["decoder_channels"] = tuple(params["decoder_channels"])
    n_regions = len(card["region_classes"])
    out_channels = n_regions + len(card["cell_classes"]) + int(bool(card.get("nucleus_mask")))

    class TilscoreNet(ModelABC):
        """tilscore's TilNet (smp backbone, normalisation inside, uint8 NCHW in) under
        TIAToolbox's interface. infer_batch returns the softmax of the region logits over
        the tile core, NHWC float32, like UNetModel.infer_batch returns its probabilities."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = getattr(smp, cls_name)(
                encoder_weights=None, in_channels=3, classes=out_channels, **params)
            mean = torch.tensor(card["mean"]).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(card["std"]).view(1, 3, 1, 1) * 255.0
            self.register_buffer("mean", mean, persistent=False)
            self.register_buffer("std", std, persistent=False)
            self.n_regions = n_regions
            self.overlap = int(card["overlap_px"])
            self.n_patches = 0

        def forward(self, imgs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return self.backbone((imgs.float() - self.mean) / self.std)

        @staticmethod
        def infer_batch(model, batch_data, *, device: str):
            net = model  # unwrap DataParallel (.module) and torch.compile (._orig_mod)
            while (inner := getattr(net, "module", None) or getattr(net, "_orig_mod", None)):
                net = inner
            net.n_patches += int(batch_data.shape[0])
            model.eval()
            dev = torch.device(device)
            use_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
            with torch.inference_mode():
                x = torch.as_tensor(batch_data)
                if dev.type == "cuda":
                    x = x.pin_memory().to(dev, non_blocking=True)
                x = x.permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW view (channels_last)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = model(x)
                ov, r = net.overlap, net.n_regions
                h, w = logits.shape[-2:]
                probs = F.softmax(logits[:, :r, ov:h - ov, ov:w - ov].float(), dim=1)
                return probs.permute(0, 2, 3, 1).cpu().numpy()  # NHWC

        @staticmethod
        def postproc(image):
            return argmax_last_axis(image=image)

    model = TilscoreNet()
    if not random_weights:  # (the same cost either way; random where weights can't travel)
        state = load_file(str(model_dir / card["weights_file"]))  # safetensors: no pickle
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        model.backbone.load_state_dict(state, strict=True)  # fp16 file -> fp32 params
    model.backbone.to(memory_format=torch.channels_last)
    model.eval()
    return model, card


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", type=Path)
    ap.add_argument("--arch", choices=["bcss", "tilscore"], default="bcss")
    ap.add_argument("--model-dir", type=Path, default=REPO / "models" / "he-default",
                    help="tilscore model folder (card.json + weights) for --arch tilscore")
    ap.add_argument("--random-weights", action="store_true",
                    help="--arch tilscore with random weights (card.json only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px of the slide")
    ap.add_argument("--reader", choices=["auto", "openslide"], default="auto",
                    help="auto: TIAToolbox's choice (see the module docstring)")
    ap.add_argument("--compile", default="default",
                    choices=["default", "disable", "reduce-overhead", "max-autotune",
                             "max-autotune-no-cudagraphs"],
                    help="TIAToolbox's rcParam torch_compile_mode; its default "
                         "torch.compile's the model on GPUs of capability 7.0/8.0/9.0 "
                         "(V100, A100, H100/H200), never on CPU")
    args = ap.parse_args()

    stubbed = stub_missing(["SimpleITK", "imagecodecs", "imagecodecs.numcodecs"])

    import torch
    from tiatoolbox import rcParam
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.wsicore.wsireader import WSIReader

    if args.reader == "openslide":
        force_openslide_reader()
    rcParam["torch_compile_mode"] = args.compile

    torch.manual_seed(0)
    if args.arch == "bcss":
        model, card = build_bcss()
        mpp, tile, core = 0.5, 1024, 512
    else:
        model, card = build_tilscore(args.model_dir, args.random_weights)
        mpp, tile = card["input_mpp"], card["tile_px"]
        core = tile - 2 * card["overlap_px"]
    n_params = sum(p.numel() for p in model.parameters())
    res = {"units": "mpp", "resolution": mpp}
    io = IOSegmentorConfig(input_resolutions=[res], output_resolutions=[res],
                           patch_input_shape=[tile, tile], patch_output_shape=[core, core],
                           stride_shape=[core, core], save_resolution=res)
    seg = SemanticSegmentor(model=model, batch_size=args.batch_size,
                            num_workers=args.workers, device=args.device, verbose=False)
    out = Path(tempfile.mkdtemp(prefix="tia-bench-"))
    busy, stop = [], threading.Event()

    def sample() -> None:  # the GPU's busy fraction from NVML, as scripts/bench.py does
        while not stop.is_set():
            try:
                busy.append(torch.cuda.utilization())
            except Exception:  # no NVML
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    if args.device.startswith("cuda"):
        sampler.start()
    t0 = time.perf_counter()
    # its readers do not take the MPP from a generic TIFF's resolution tags: give it
    reader = WSIReader.open(args.slide, mpp=(args.mpp, args.mpp))
    seg.run([reader], patch_mode=False, ioconfig=io, save_dir=out / "run",
            overwrite=True, output_type="zarr", device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    stop.set()
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
    shutil.rmtree(out, ignore_errors=True)
    line = {"engine": "tiatoolbox SemanticSegmentor", "arch": args.arch, "seconds": dt,
            "peak_rss_gb": int(hwm) / 1e6, "parameters": n_params,
            "patches": (len(seg.output_locations) if seg.output_locations is not None
                        else getattr(model, "n_patches", None)),
            "patch": [tile, core, core], "mpp": mpp,
            "batch_size": args.batch_size, "workers": args.workers,
            "device": args.device, "reader": type(reader).__name__,
            "torch_compile": args.compile,
            "compiled": type(seg.model).__name__ == "OptimizedModule",
            "slide": str(args.slide)}
    if args.device.startswith("cuda"):
        line["gpu"] = torch.cuda.get_device_name()
        line["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        line["gpu_busy"] = sum(busy) / len(busy) / 100 if busy else None
    if stubbed:
        line["stubbed"] = stubbed
    print(json.dumps(line))


if __name__ == "__main__":
    main()
