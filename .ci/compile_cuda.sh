#!/usr/bin/env bash
# Compile every csrc/cuda/**/*.cu with nvcc -c (no GPU needed), so CUDA code
# cannot rot unseen. Warnings are errors. Exits 0 when there is nothing to
# compile; otherwise compiles every file and exits 1 if any failed.
#
#   .ci/compile_cuda.sh            # from anywhere inside the repository
#   NVCC=/path/to/nvcc .ci/compile_cuda.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi

mapfile -t sources < <(find csrc/cuda -type f -name '*.cu' 2>/dev/null | LC_ALL=C sort)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "compile_cuda: no .cu files under csrc/cuda, nothing to compile"
  exit 0
fi

outdir="$(mktemp -d "${TMPDIR:-/tmp}/pymerge-cuda.XXXXXX")"
trap 'rm -rf "$outdir"' EXIT

flags=(
  -c -std=c++17 -Icsrc
  --Werror all-warnings
  -Xcompiler -Wall,-Werror
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
)

"$nvcc" --version | tail -n 1
failed=()
for src in "${sources[@]}"; do
  obj="$outdir/$(echo "$src" | tr '/' '_').o"
  echo "nvcc ${flags[*]} $src"
  if ! "$nvcc" "${flags[@]}" "$src" -o "$obj"; then
    failed+=("$src")
  fi
done
if [ "${#failed[@]}" -ne 0 ]; then
  echo "compile_cuda: ${#failed[@]} of ${#sources[@]} file(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "compile_cuda: ${#sources[@]} file(s) compiled"
