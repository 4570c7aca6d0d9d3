#!/usr/bin/env bash
# Everything we measure on a lent GPU machine, in one call (docs/benchmarks.md, GPU).
#
# The machine has torch/torchvision/timm but no network: carry our other dependencies as
# wheels in .whl/ (../shared/tools/device-wheels.sh prints how). Then, from the repo root:
#   bash scripts/gpu_session.sh [SIZES...]        (default: 16384 32768)
# Logs and JSON go to $OUT (default /tmp/gpu-out). Steps: environment, the GPU tests,
# synthetic slides, scripts/bench.py on CUDA (default settings, then decoding in threads,
# batch and thread variants on the largest slide), and the default test suite with CUDA
# present (tests use --device auto, so the CUDA path runs end to end).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
SIZES=("${@:-16384 32768}")
read -r -a SIZES <<<"${SIZES[*]}"
BIG=${SIZES[-1]}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
step() { echo "=== $(date +%T) $*"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
nproc; free -g | head -2
python3 -c "import torch, tilscore; print('torch', torch.__version__, torch.cuda.get_device_name())"

step gpu tests
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_infer.py tests/test_ihc.py 2>&1 | tail -4

step synthetic slides
for s in "${SIZES[@]}"; do
  /usr/bin/time -f "synth $s: %e s, %M KB" python3 -c "
import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import bench
bench.ensure_slide($s, Path('/tmp'), 'he')"
done

step "bench: defaults"
python3 scripts/bench.py --sizes "${SIZES[@]}" --device cuda --no-naive \
  --json "$OUT/bench_default.json" \
  2>&1 | tee "$OUT/bench_default.log" | grep -v '^{'
variant() {
  step "bench: $BIG with $*"
  tag=$(echo "$*" | tr -d ' -')
  python3 scripts/bench.py --sizes "$BIG" --device cuda --no-naive "$@" \
    --json "$OUT/bench_$tag.json" 2>&1 | grep -v '^{' | tail -2
}
variant --decode threads

step "default test suite with CUDA present"
# (ihc-default's weights may not travel with the wheels: its pipeline tests are left out)
timeout 180 python3 -m pytest -q -p no:cacheprovider -n 8 tests \
  --ignore=tests/test_ihc_pipeline.py 2>&1 | tail -15

variant --batch-size 64
step done
