#!/usr/bin/env bash
# TIAToolbox's engine on a lent GPU machine, on the same synthetic slide as
# scripts/gpu_session.sh (docs/benchmarks.md, "Same network in both engines").
#
# Carry .whl (scripts/gpu_session.sh) and .whl-tia: tiatoolbox 2.1.3 and the packages its
# import chain needs that the GPU image lacks (dask, umap-learn, pynndescent,
# universal-pathlib, defusedxml). From the repo root:
#   bash scripts/gpu_tia.sh [SIZE]      (default 16384; makes the slide if it is missing)
# The model weights need not travel: the tilscore network runs with random weights here
# (the cost of a forward pass does not depend on them).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
SIZE=${1:-16384}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl .whl-tia/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
SLIDE=/tmp/tilscore-bench-he-$SIZE.tiff
[ -f "$SLIDE" ] || python3 -c "
import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import bench
bench.ensure_slide($SIZE, Path('/tmp'), 'he')"
for compile in disable default; do
  for workers in 8 14; do
    echo "=== $(date +%T) TIAToolbox, tilscore's network, compile=$compile, $workers workers"
    python3 scripts/bench_tiatoolbox.py "$SLIDE" --arch tilscore --random-weights \
      --device cuda --batch-size 32 --workers "$workers" --reader openslide \
      --compile "$compile" >"$OUT/tia_${compile}_$workers.log" 2>&1
    tail -1 "$OUT/tia_${compile}_$workers.log"
  done
done
echo "=== $(date +%T) TIAToolbox, BCSS U-Net (product default), 14 workers"
python3 scripts/bench_tiatoolbox.py "$SLIDE" --arch bcss --device cuda --batch-size 32 \
  --workers 14 --reader openslide >"$OUT/tia_bcss.log" 2>&1
tail -1 "$OUT/tia_bcss.log"
echo "=== $(date +%T) done"
