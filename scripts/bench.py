#!/usr/bin/env python
"""End-to-end scoring benchmark on synthetic slides of growing size, per stage.

Usage:  .venv/bin/python scripts/bench.py [--sizes 8192 16384 32768] [--device auto]
                                         [--stain he] [--batch-size 8] [--json OUT]

For each size, writes (or reuses) a synthetic 40x (0.25 µm/px) slide in --cache, scores it
with `tilscore.batch.score_inputs` in a fresh subprocess (so peak RSS is that run's), and
reports: wall seconds; per stage (tissue: thumbnail + mask; read: waiting for the tile
loader; model: forward + on-device post-processing incl. host copies; stitch; aggregate:
regions, cells and scores; write: every output file); tiles/s; mm² of tissue per second;
peak RSS (VmHWM); on CUDA the peak GPU memory and the model's share of the slide's time.
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
import json, sys, time, tempfile
from pathlib import Path
from tilscore.batch import score_inputs
slide, device, stain, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out = Path(tempfile.mkdtemp(prefix="tilscore-bench-out-"))
t0 = time.perf_counter()
res = score_inputs([slide], out, device=device, stain=stain, batch_size=batch, quiet=True,
                   report=False)
wall = time.perf_counter() - t0
if res.failures:
    raise SystemExit(res.failures[0]["error"])
summary = json.loads(next(out.glob("*/summary.json")).read_text())
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
gpu = {}
import torch
if torch.cuda.is_available() and summary["device"].startswith("cuda"):
    gpu = {"peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 1e9}
print(json.dumps({"wall_s": wall, "summary": summary, "peak_rss_gb": int(hwm) / 1e6, **gpu}))
"""


def ensure_slide(size: int, cache: Path, stain: str) -> Path:
    path = cache / f"tilscore-bench-{stain}-{size}.tiff"
    if not path.exists():
        from tilscore.synth import write_synthetic_slide

        t0 = time.perf_counter()
        write_synthetic_slide(path, stain=stain, seed=7, size_px=(size, size), mpp=0.25)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def run_one(slide: Path, device: str, stain: str, batch: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(slide), device, stain, str(batch)],
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
           "device": s["device"]}
    if "peak_gpu_mem_gb" in r:
        row["peak_gpu_mem_gb"] = r["peak_gpu_mem_gb"]
        row["model_share"] = t["model"] / s["runtime_s"]
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
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path("/tmp"))
    ap.add_argument("--no-naive", action="store_true", help="skip the read_region reference")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    rows = []
    for size in args.sizes:
        slide = ensure_slide(size, args.cache, args.stain)
        row = run_one(slide, args.device, args.stain, args.batch_size)
        row["size_px"] = size
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    naive = None if args.no_naive else naive_decode_s(ensure_slide(max(args.sizes), args.cache,
                                                                    args.stain))
    cols = ["size_px", "tissue_mm2", "tiles", "runtime_s", "tissue_s", "read_s", "model_s",
            "stitch_s", "aggregate_s", "write_s", "tiles_per_s", "mm2_per_s", "peak_rss_gb"]
    cols += [c for c in ("peak_gpu_mem_gb", "model_share") if c in rows[0]]
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
    main()
