#!/usr/bin/env python
"""Tile loader throughput vs a naive openslide.read_region loop, and peak memory.

Usage:  .venv/bin/python scripts/bench_read.py [--size 16384] [--slide PATH] [--json OUT]

Writes (or reuses) a synthetic 40x (0.25 µm/px) slide, builds the tile grid over its tissue
and times, on the same tiles:
  * naive: for each tile, OpenSlide read_region at level 0 → RGB numpy (and, for tiles at
    0.5 µm/px, a PIL resize) — what a straightforward pipeline does;
  * tilscore's loader (block reads) with 1 and 2 threads, and 2 worker processes.
Each loader run happens in a fresh subprocess, which also reports its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def grid_for(slide_path: str, tile_mpp: float, tile_px: int, overlap_px: int):
    from tilscore.prepare.tiles import TileSpec, tile_grid
    from tilscore.prepare.tissue import tissue_mask
    from tilscore.slide import open_slide

    with open_slide(slide_path) as slide:
        mask = tissue_mask(slide)
        return tile_grid(slide.dimensions, slide.mpp, spec=TileSpec(tile_mpp, tile_px, overlap_px),
                         mask=mask)


def naive(slide_path: str, tile_mpp: float, tile_px: int, overlap_px: int) -> dict:
    import numpy as np
    import openslide
    from PIL import Image

    grid = grid_for(slide_path, tile_mpp, tile_px, overlap_px)
    osr = openslide.OpenSlide(slide_path)
    ds = grid.downsample
    side_l0 = int(round(tile_px * ds))
    t0 = time.perf_counter()
    checksum = 0
    for x, y in grid.origins_l0:
        img = osr.read_region((int(round(x)), int(round(y))), 0, (side_l0, side_l0)).convert("RGB")
        if side_l0 != tile_px:
            img = img.resize((tile_px, tile_px), Image.BOX)
        checksum += int(np.asarray(img)[0, 0, 0])
    dt = time.perf_counter() - t0
    return {"tiles": len(grid), "seconds": dt, "tiles_per_s": len(grid) / dt}


def loader(slide_path: str, tile_mpp: float, tile_px: int, overlap_px: int, workers: int,
           processes: bool) -> dict:
    import torch  # noqa: F401  (imported once per process; not part of streaming cost)

    from tilscore.prepare.tiles import LoaderStats, SlideRef, iter_tile_batches

    grid = grid_for(slide_path, tile_mpp, tile_px, overlap_px)
    stats = LoaderStats()
    t0 = time.perf_counter()
    for _ in iter_tile_batches(SlideRef(slide_path), grid, batch_size=16, workers=workers,
                               use_processes=processes, stats=stats):
        pass
    dt = time.perf_counter() - t0
    return {"tiles": stats.tiles, "seconds": dt, "tiles_per_s": stats.tiles / dt}


def run_child(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; returns its result + peak RSS (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16384, help="synthetic slide side (px)")
    ap.add_argument("--slide", default=None, help="use this slide instead of a synthetic one")
    ap.add_argument("--json", default=None, help="also write results here")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        kind, path, mpp, tile, ov, workers, procs = args.child
        fn = naive if kind == "naive" else loader
        extra = [] if kind == "naive" else [int(workers), procs == "1"]
        res = fn(path, float(mpp), int(tile), int(ov), *extra)
        # VmHWM of this process (ru_maxrss would include the parent's mark, inherited
        # across fork+exec on Linux).
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
        res["peak_rss_mib"] = int(hwm.split()[1]) / 1024
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        res["peak_rss_children_mib"] = kids
        print(json.dumps(res))
        return

    slide = args.slide
    if slide is None:
        from tilscore.synth.writer import write_synthetic_slide

        slide = f"/tmp/tilscore-bench-{args.size}.tiff"
        if not Path(slide).exists():
            t0 = time.perf_counter()
            write_synthetic_slide(slide, stain="he", seed=7, size_px=(args.size, args.size))
            print(f"synthesised {slide} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    results = {"slide": slide, "machine": f"{platform.node()} {platform.processor()} "
               f"{len(__import__('os').sched_getaffinity(0))} cores",
               "date": time.strftime("%Y-%m-%d"), "runs": []}
    for mpp, tile, ov in ((0.25, 512, 32), (0.5, 512, 32)):
        for kind, workers, procs in (("naive", 1, 0), ("loader", 1, 0), ("loader", 2, 0),
                                     ("loader", 2, 1)):
            res = run_child([kind, slide, str(mpp), str(tile), str(ov), str(workers), str(procs)])
            res.update({"kind": kind, "tile_mpp": mpp, "tile_px": tile, "overlap_px": ov,
                        "workers": workers, "processes": bool(procs)})
            results["runs"].append(res)
            print(f"{kind:6s} mpp={mpp} workers={workers} procs={procs}: "
                  f"{res['tiles']} tiles, {res['tiles_per_s']:.1f} tiles/s, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
