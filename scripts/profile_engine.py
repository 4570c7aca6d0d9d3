#!/usr/bin/env python
"""Where the engine's time goes: torch.profiler over one warm pass of the tile loop.

Usage:  .venv/bin/python scripts/profile_engine.py SLIDE [--device auto] [--stain he]
            [--batch-size N] [--compile [MODE]] [--out DIR]

Runs `predict_slide` (read + model + decoding + stitching) over SLIDE's tissue tiles once
to warm up (cuDNN autotuning, compilation), then once under `torch.profiler` with CPU and,
on CUDA, CUDA activities. Prints the operators by self CPU time and by CUDA time, the
engine's own stage timings and, on CUDA, the share of the pass the GPU spent in kernels;
writes a Chrome trace (`DIR/engine_trace.json`, open in https://ui.perfetto.dev) where
the gaps between kernels show what the host was doing. Made for the GPU machine
(`scripts/gpu_session.sh`, step `profile`); runs on CPU too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stain", default="he")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the device's")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    choices=["default", "reduce-overhead", "max-autotune"])
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tilscore.engine.infer import default_batch_size, default_read_threads, predict_slide
    from tilscore.engine.load import Engine
    from tilscore.prepare.tiles import prepare_slide
    from tilscore.slide import open_slide

    engine = Engine.load(None, args.stain, device=args.device,
                         compile_model=args.compile or False)
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    card = engine.card
    batch = args.batch_size or default_batch_size(engine.device)
    threads = default_read_threads(engine.device, engine.cores)
    args.out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with open_slide(args.slide) as slide, tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_slide(slide, card)
        mask, grid = prepared.mask, prepared.grid

        def run(k: int):
            return predict_slide(slide, grid, predictor=engine.predictor,
                                 store_path=Path(tmp) / f"{k}.zarr",
                                 workers=threads, batch_size=batch, tissue=mask,
                                 decode="auto")

        run(0)  # warm-up
        sync()
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            pred = run(1)
            sync()
            wall = time.perf_counter() - t0
    trace = args.out / "engine_trace.json"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    result = {"slide": str(args.slide), "device": str(engine.device), "tiles": len(grid),
              "batch_size": batch, "compile": args.compile, "engine_s": round(wall, 3),
              "timings_s": {k: round(v, 3) for k, v in pred.timings_s.items()},
              "trace": str(trace)}
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=25))
        kernel_s = sum(e.self_device_time_total for e in events
                       if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        result.update(kernel_s=round(kernel_s, 3), kernel_share=round(kernel_s / wall, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    from tilscore.errors import TilscoreError

    try:
        main()
    except TilscoreError as exc:  # bad input: one line, as the tilscore command gives
        sys.exit(f"error: {exc}")
