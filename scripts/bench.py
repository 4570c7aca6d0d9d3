#!/usr/bin/env python
"""End-to-end scoring benchmark on synthetic slides of growing size, per stage.

Usage:  .venv/bin/python scripts/bench.py [--sizes 8192 16384 32768] [--device auto]
            [--stain he] [--batch-size N] [--read-threads N] [--compile [MODE]] [--json OUT]
            [--decode auto|host|device|processes] [--mode full|fast] [--engine]

For each size, writes (or reuses) a synthetic 40x (0.25 µm/px) slide in --cache, scores it
with `tilscore.batch.score_inputs` in a fresh subprocess (so peak RSS is that run's), and
reports: wall seconds; per stage (tissue: thumbnail + mask; read: waiting for the tile
loader; model: forward + on-device post-processing incl. host copies; stitch; aggregate:
regions, cells and scores; write: every output file); tiles/s; mm² of tissue per second;
peak RSS (VmHWM); on CUDA the peak GPU memory and the model's share of the slide's time,
then, warm, the engine alone (read + model + stitch: tiles/s, mm²/s, the GPU's busy
fraction sampled from NVML every 50 ms) and the tile loader alone (the decode limit).
Also times the naive decode reference (openslide.read_region over the same tiles) once
for the largest slide. Time should grow linearly with tissue area and memory stay flat.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, threading, time, tempfile
from pathlib import Path
from tilscore.batch import score_inputs
slide, device, stain = sys.argv[1], sys.argv[2], sys.argv[3]
batch, threads, engine_only = (None if a == "auto" else int(a) for a in sys.argv[4:7])
compile_model = {"0": False, "1": True}.get(sys.argv[7], sys.argv[7])  # or a mode
decode, mode = sys.argv[8], sys.argv[9]  # decode: auto, host, device or processes
out = Path(tempfile.mkdtemp(prefix="tilscore-bench-out-"))
t0 = time.perf_counter()
res = score_inputs([slide], out, device=device, stain=stain, batch_size=batch, quiet=True,
                   read_threads=threads, compile=compile_model, report=False,
                   decode="host" if decode == "processes" else decode, mode=mode)
wall = time.perf_counter() - t0
if res.failures:
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    raise SystemExit(res.failures[0]["error"])
summary = json.loads(next(out.glob("*/summary.json")).read_text())
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
extra = {}
import torch
cuda = torch.cuda.is_available() and summary["device"].startswith("cuda")
if cuda:
    extra["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
if cuda or engine_only:
    # The engine alone (read + model + stitch), warm, with the GPU's busy fraction
    # sampled from NVML (percent of time a kernel ran) every 50 ms; and the loader alone.
    from tilscore.engine.device_decode import device_tile_reader, iter_device_batches
    from tilscore.engine.infer import default_batch_size, default_read_threads, predict_slide
    from tilscore.engine.load import Engine
    from tilscore.slide import open_slide
    from tilscore.prepare.tiles import SlideRef, iter_tile_batches, prepare_slide
    engine = Engine.load(None, stain, device=device, compile_model=compile_model)
    card = engine.card
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    threads = threads or default_read_threads(engine.device, engine.cores)
    batch = batch or default_batch_size(engine.device)
    with open_slide(slide) as s:
        prepared = prepare_slide(s, card)
        mask, grid = prepared.mask, prepared.grid
        procs = decode == "processes"
        on_device = decode == "device" or (decode == "auto" and cuda)
        source = SlideRef(slide) if procs else s
        samples, stop = [], threading.Event()
        def sample():
            while cuda and not stop.is_set():
                try:
                    samples.append(torch.cuda.utilization(engine.device))
                except Exception as exc:  # no NVML: no busy fraction
                    print("no GPU utilisation:", exc, file=sys.stderr)
                    return
                time.sleep(0.05)
        for rep in range(2 if cuda else 1):  # a first pass warms up (and compiles)
            sync()
            samples.clear()
            stop.clear()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t1 = time.perf_counter()
            pred = predict_slide(source, grid, engine.predictor, out / f"engine{rep}.zarr",
                                 workers=threads, batch_size=batch, tissue=mask,
                                 use_processes=procs,
                                 decode="device" if on_device else "host")
            sync()
            engine_s = time.perf_counter() - t1
            stop.set()
            sampler.join()
        t1 = time.perf_counter()
        reader = device_tile_reader(s, grid) if on_device else None
        batches = (iter_device_batches(reader, s, grid, engine.device, batch_size=batch)
                   if reader is not None else
                   iter_tile_batches(source, grid, batch_size=batch, workers=threads,
                                     use_processes=procs))
        n = sum(len(b.index) for b in batches)
        sync()
        if reader is not None:
            reader.close()
        decode_s = time.perf_counter() - t1
    extra.update(engine_s=engine_s, engine_timings=pred.timings_s,
                 gpu_busy=sum(samples) / len(samples) / 100 if samples else None,
                 samples=len(samples), decode_only_s=decode_s, decode_tiles=n,
                 read_threads=threads, batch_size=batch,
                 decode=("device" if reader is not None else
                         "processes" if procs else "threads"))
import shutil  # noqa: E402
shutil.rmtree(out, ignore_errors=True)  # the scored outputs are not needed (tens of MB)
print(json.dumps({"wall_s": wall, "summary": summary, "peak_rss_gb": int(hwm) / 1e6, **extra}))
"""


def ensure_slide(size: int, cache: Path, stain: str) -> Path:
    path = cache / f"tilscore-bench-{stain}-{size}.tiff"
    if not path.exists():
        from tilscore.synth.writer import write_synthetic_slide

        t0 = time.perf_counter()
        from tilscore.engine.infer import usable_cores

        write_synthetic_slide(path, stain=stain, seed=7, size_px=(size, size), mpp=0.25,
                              workers=usable_cores())
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def run_one(slide: Path, device: str, stain: str, batch: int | None,
            threads: int | None = None, compile_model: bool | str = False,
            engine_only: bool = False, decode: str = "auto", mode: str = "full") -> dict:
    args = [str(v) if v else "auto" for v in (batch, threads)]
    args += [str(int(engine_only)),
             compile_model if isinstance(compile_model, str) else str(int(compile_model)),
             decode, mode]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), device, stain, *args],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench run failed: {proc.stderr.strip().splitlines()[-1]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    s = r["summary"]
    t = s["timings_s"]
    area = s["areas_mm2"]["tissue"]
    row = {"size_px": None, "tissue_mm2": area, "tiles": s["qc"]["tiles"],
           "wall_s": r["wall_s"], "runtime_s": s["runtime_s"],
           **{f"{k}_s": t.get(k) for k in ("tissue", "read", "model", "stitch", "aggregate",
                                           "write")},
           "tiles_per_s": s["qc"]["tiles"] / s["runtime_s"],
           "mm2_per_s": area / s["runtime_s"], "peak_rss_gb": r["peak_rss_gb"],
           "device": s["device"], "mode": s.get("mode", "full")}
    if "fast" in s:
        row.update(region_tiles=s["fast"]["region_tiles"], cell_tiles=s["fast"]["cell_tiles"],
                   region_pass_s=t.get("region_pass"), cell_pass_s=t.get("cell_pass"),
                   stromal_til_percent=s.get("stromal_til_percent"))
    if "peak_gpu_mem_gb" in r:
        row["peak_gpu_mem_gb"] = r["peak_gpu_mem_gb"]
        row["model_share"] = t["model"] / s["runtime_s"]
    if "engine_s" in r:
        row.update({k: r[k] for k in ("engine_s", "engine_timings", "gpu_busy", "samples",
                                      "decode_only_s", "decode_tiles", "read_threads",
                                      "batch_size", "decode")})
        row["engine_tiles_per_s"] = s["qc"]["tiles"] / r["engine_s"]
        row["engine_mm2_per_s"] = area / r["engine_s"]
        row["decode_tiles_per_s"] = r["decode_tiles"] / r["decode_only_s"]
    return row


def naive_decode_s(slide: Path) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_read import naive  # the decode reference of scripts/bench_read.py

    return naive(str(slide), 0.5, 512, 32)["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stain", default="he")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the device's")
    ap.add_argument("--read-threads", type=int, default=None, help="default: the device's")
    ap.add_argument("--compile", nargs="?", const="default", default=None,
                    choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile the network and its decoding; reduce-overhead: "
                    "CUDA graphs on CUDA (one launch per batch)")
    ap.add_argument("--decode", choices=["auto", "host", "device", "processes"],
                    default="auto", help="where JPEG tiles are decoded: auto (on the GPU "
                    "with CUDA), host threads, device, or host processes (engine pass only)")
    ap.add_argument("--mode", choices=["full", "fast"], default="full",
                    help="scoring mode (fast: regions at 2 µm/px, cells in bulk stroma)")
    ap.add_argument("--engine", action="store_true",
                    help="also time the engine and the loader alone (always on CUDA)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"))
    ap.add_argument("--no-naive", action="store_true", help="skip the read_region reference")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    rows = []
    for size in args.sizes:
        slide = ensure_slide(size, args.cache, args.stain)
        row = run_one(slide, args.device, args.stain, args.batch_size, args.read_threads,
                      args.compile or False, args.engine, args.decode, args.mode)
        row["size_px"] = size
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    naive = None if args.no_naive else naive_decode_s(ensure_slide(max(args.sizes), args.cache,
                                                                    args.stain))
    cols = ["size_px", "tissue_mm2", "tiles", "runtime_s", "tissue_s", "read_s", "model_s",
            "stitch_s", "aggregate_s", "write_s", "tiles_per_s", "mm2_per_s", "peak_rss_gb"]
    cols += [c for c in ("mode", "region_tiles", "cell_tiles", "stromal_til_percent",
                         "peak_gpu_mem_gb", "model_share", "engine_s", "engine_tiles_per_s",
                         "engine_mm2_per_s", "gpu_busy", "decode_tiles_per_s")
             if c in rows[0] and rows[0][c] is not None]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"device {rows[0]['device']}, {time.strftime('%Y-%m-%d')}")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                                for c in cols) + " |")
    if naive is not None:
        print(f"naive openslide.read_region over the {max(args.sizes)}² slide's tiles: "
              f"{naive:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "naive_read_s": naive}, indent=2))


if __name__ == "__main__":
    from tilscore.errors import TilscoreError

    try:
        main()
    except TilscoreError as exc:  # bad input: one line, as the tilscore command gives
        sys.exit(f"error: {exc}")
