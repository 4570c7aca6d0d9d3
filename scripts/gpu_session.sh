#!/usr/bin/env bash
# Everything we measure on a lent GPU machine (docs/benchmarks.md, GPU).
#
# The machine has torch/torchvision/timm but no network: carry our other dependencies as
# wheels in .whl/ (../shared/tools/device-wheels.sh prints how). Then, from the repo root:
#   STEPS="env tests synth bench fast variants graphs profile overlap suite" bash scripts/gpu_session.sh [SIZES...]
# (default SIZES: 16384 32768; default STEPS: all of them, in that order). Logs and JSON
# go to $OUT (default /tmp/gpu-out). Steps: environment; the GPU tests (nvJPEG decoding,
# CUDA vs CPU) and the device-decoding and fast-mode tests on CUDA; synthetic slides;
# scripts/bench.py on CUDA with the defaults (JPEG decoded on the GPU), the fast mode,
# and variants on the largest slide (host decoding, batch 64); CUDA graphs (torch.compile
# mode reduce-overhead of the forward pass and its decoding, engine pass warm); torch.profiler
# over a warm engine pass, eager and with graphs (scripts/profile_engine.py: operator tables,
# kernel share, Chrome traces in $OUT); a batch of the slides
# scored twice, with and without overlapped writes (slide N-1 written while N uses the
# GPU: BatchOptions.overlap_writes), wall time of each; the default test suite
# with CUDA present (tests use --device auto, so the CUDA path runs end to end).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
SIZES=("${@:-16384 32768}")
read -r -a SIZES <<<"${SIZES[*]}"
BIG=${SIZES[-1]}
STEPS=${STEPS:-env tests synth bench fast variants graphs profile overlap suite}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
step() { echo "=== $(date +%T) $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

if want env; then
  step environment
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc; free -g | head -2
  python3 -c "import torch, torchvision, tilscore; print('torch', torch.__version__,
torchvision.__version__, torch.cuda.get_device_name())"
fi

if want tests; then
  step gpu tests
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_infer.py tests/test_ihc.py \
    tests/test_device_decode.py 2>&1 | tail -4
  step "device decoding and fast mode on CUDA"
  python3 -m pytest -q -p no:cacheprovider tests/test_device_decode.py tests/test_fast.py \
    2>&1 | tail -4
fi

if want synth; then
  step synthetic slides
  for s in "${SIZES[@]}"; do
    /usr/bin/time -f "synth $s: %e s, %M KB" python3 -c "
import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import bench
bench.ensure_slide($s, Path('/tmp'), 'he')"
  done
fi

variant() {
  step "bench: $BIG with $*"
  tag=$(echo "$*" | tr -d ' -')
  python3 scripts/bench.py --sizes "$BIG" --device cuda --no-naive "$@" \
    --json "$OUT/bench_$tag.json" 2>&1 | grep -v '^{' | tail -2
}
if want bench; then
  step "bench: defaults"
  python3 scripts/bench.py --sizes "${SIZES[@]}" --device cuda --no-naive \
    --json "$OUT/bench_default.json" 2>&1 | tee "$OUT/bench_default.log" | grep -v '^{'
fi
if want fast; then
  variant --mode fast
fi
if want variants; then
  variant --decode host
  variant --batch-size 64
fi

if want graphs; then
  variant --compile reduce-overhead
  variant --compile reduce-overhead --batch-size 64
fi

if want profile; then
  for mode in eager reduce-overhead; do
    step "profile: engine pass on $BIG, $mode"
    flag=(); [ "$mode" = eager ] || flag=(--compile "$mode")
    mkdir -p "$OUT/profile-$mode"
    python3 scripts/profile_engine.py "/tmp/tilscore-bench-he-$BIG.tiff" --device cuda \
      "${flag[@]}" --out "$OUT/profile-$mode" > "$OUT/profile-$mode/tables.txt" 2>&1
    tail -1 "$OUT/profile-$mode/tables.txt"
  done
fi

if want overlap; then
  for ov in True False; do
    step "batch of ${SIZES[*]} x2, overlap_writes=$ov"
    python3 -c "
import time, shutil
from tilscore.batch import score_inputs
slides = [f'/tmp/tilscore-bench-he-{s}.tiff' for s in '${SIZES[*]}'.split()] * 2
shutil.rmtree('/tmp/ov-out', ignore_errors=True)
# each slide twice under its own id: copies by symlink
import os; os.makedirs('/tmp/ov-in', exist_ok=True); paths = []
for k, p in enumerate(slides):
    q = f'/tmp/ov-in/s{k}.tiff'
    if not os.path.exists(q): os.symlink(p, q)
    paths.append(q)
t = time.perf_counter()
r = score_inputs(paths, '/tmp/ov-out', device='cuda', quiet=True, report=False,
                 overlap_writes=$ov)
print('overlap_writes=$ov', len(r.scored), 'slides', round(time.perf_counter() - t, 2), 's')
" 2>&1 | tail -1 | tee -a "$OUT/overlap.log"
  done
fi

if want suite; then
  step "default test suite with CUDA present"
  # (ihc-default's weights may not travel with the wheels: its pipeline tests are left out)
  timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests \
    --ignore=tests/test_ihc_pipeline.py 2>&1 | tail -15
fi
step done
