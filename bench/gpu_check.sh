#!/usr/bin/env bash
# One GPU check on a machine with a CUDA GPU, nvcc and a CUDA build of torch,
# from a fresh checkout: build pymerge._C_cuda (and pymerge._C), run the GPU
# tests (`pytest -m gpu`) and the Triton tests compiled for the GPU
# (TRITON_INTERPRET=0), then the GPU kernel benchmark. Everything lands in $OUT
# (default ./gpu_check_out):
#   env.txt           device, driver, torch, nvcc
#   build.log         the build
#   pytest_gpu.txt    python -m pytest -m gpu
#   pytest_triton.txt the Triton backend tests on the GPU
#   gpu_bench.md      the benchmark table (device, date, copy bandwidth, per op/backend/k: ms, GB/s, % of copy, vs torch)
#   gpu_bench.json    the same numbers
#   gpu_e2e.md        end-to-end merges from host memory vs the pinned host-to-device bandwidth
#
#   bash bench/gpu_check.sh
#   GPU_CHECK_STAGES=build,test bash bench/gpu_check.sh      # a subset
#   GPU_BENCH_ARGS="--sizes 16M,64M --k 2,8" bash bench/gpu_check.sh
#
#   GPU_CHECK_STAGES takes: build, test, triton, bench, e2e
#
# Needs no network: the build uses the installed setuptools/pybind11 (no build
# isolation); if an editable install is not possible it builds in place.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STAGES="${GPU_CHECK_STAGES:-build,test,triton,bench,e2e}"
export PYTHONUNBUFFERED=1
status=0

has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "== gpu_check: $*" >&2; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1
  nvcc --version 2>&1 | tail -n 2
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# Editable install where possible (maps triton_kernels/ to pymerge.triton_kernels); else in place.
use_in_place() {
  [ -e pymerge/triton_kernels ] || ln -s ../triton_kernels pymerge/triton_kernels
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
}

if has_stage build; then
  say "building (PYMERGE_CUDA=1)"
  if PYMERGE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    say "editable install done"
  else
    say "editable install failed (see build.log); building in place"
    if ! PYMERGE_CUDA=1 "$PY" setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
      tail -n 40 "$OUT/build.log"
      say "BUILD FAILED"
      exit 1
    fi
    use_in_place
  fi
elif ! "$PY" -c "import pymerge" 2>/dev/null; then
  use_in_place
fi
if ! "$PY" -c "import pymerge" 2>/dev/null || ! "$PY" -c "import pymerge.triton_kernels" 2>/dev/null; then
  use_in_place
fi

"$PY" - <<'EOF' || status=1
import torch
from pymerge import backends
from pymerge.backends import cuda
print("cuda backend built:", cuda.built(), "available:", cuda.available(), "backends:", backends.available())
assert cuda.available(), "pymerge._C_cuda did not build or sees no GPU"
EOF

if has_stage test; then
  say "pytest -m gpu"
  "$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if has_stage triton; then
  say "triton tests on the GPU (TRITON_INTERPRET=0)"
  TRITON_INTERPRET=0 "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_triton_*.py 2>&1 | tee "$OUT/pytest_triton.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if has_stage bench; then
  say "benchmark"
  # shellcheck disable=SC2086
  "$PY" bench/gpu_bench.py ${GPU_BENCH_ARGS:-} --out "$OUT/gpu_bench.md" || status=1
fi

if has_stage e2e; then
  say "end-to-end merges"
  "$PY" bench/gpu_e2e.py --out "$OUT/gpu_e2e.md" || status=1
fi

say "done (status $status); results in $OUT"
exit $status
