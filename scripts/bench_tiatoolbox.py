#!/usr/bin/env python
"""Product-to-product anchor: TIAToolbox's BCSS-architecture U-Net on a synthetic slide.

Runs in TIAToolbox's own virtual environment (it brings its own torch), never imported by
tilscore. Random weights (the architecture is what costs time; nothing is downloaded):
``UNetModel(3, 3, encoder="resnet50", decoder_block=[3, 3])``, 1024² patches at
0.5 µm/px, 512² outputs, stride 512, through ``SemanticSegmentor`` on the whole slide.

Usage:
  python3 -m venv /tmp/tia-venv && /tmp/tia-venv/bin/pip install tiatoolbox
  /tmp/tia-venv/bin/python scripts/bench_tiatoolbox.py SLIDE [--device cpu] [--batch-size 4]
Prints one JSON line: seconds, peak RSS (VmHWM), patches, parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("slide", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px of the slide")
    args = ap.parse_args()

    import torch
    from tiatoolbox.models.architecture.unet import UNetModel
    from tiatoolbox.models.engine.io_config import IOSegmentorConfig
    from tiatoolbox.models.engine.semantic_segmentor import SemanticSegmentor
    from tiatoolbox.wsicore.wsireader import WSIReader

    torch.manual_seed(0)
    model = UNetModel(3, 3, encoder="resnet50", decoder_block=[3, 3])
    n_params = sum(p.numel() for p in model.parameters())
    res = {"units": "mpp", "resolution": 0.5}
    io = IOSegmentorConfig(input_resolutions=[res], output_resolutions=[res],
                           patch_input_shape=[1024, 1024], patch_output_shape=[512, 512],
                           stride_shape=[512, 512], save_resolution=res)
    seg = SemanticSegmentor(model=model, batch_size=args.batch_size,
                            num_workers=args.workers, device=args.device, verbose=False)
    out = Path(tempfile.mkdtemp(prefix="tia-bench-"))
    t0 = time.perf_counter()
    # its readers do not take the MPP from a generic TIFF's resolution tags: give it
    reader = WSIReader.open(args.slide, mpp=(args.mpp, args.mpp))
    seg.run([reader], patch_mode=False, ioconfig=io, save_dir=out / "run",
            overwrite=True, output_type="zarr", device=args.device)
    dt = time.perf_counter() - t0
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"engine": "tiatoolbox SemanticSegmentor", "seconds": dt,
                      "peak_rss_gb": int(hwm) / 1e6, "parameters": n_params,
                      "device": args.device, "slide": str(args.slide)}))


if __name__ == "__main__":
    main()
