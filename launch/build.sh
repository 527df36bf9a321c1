#!/usr/bin/env bash
# Configures and builds moeprune (Release) in build/. Runs launch/setup.sh first.
# Extra arguments go to CMake's configure step, e.g. -DMOEPRUNE_CUDA=OFF.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${MOEPRUNE_BUILD_DIR:-$ROOT/build}"
"$ROOT/launch/setup.sh"
TORCH_PREFIX="$("$ROOT/.venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null)"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
if [ ! -f "$BUILD/CMakeCache.txt" ] || [ "$#" -gt 0 ]; then
  echo "[build] configuring $BUILD"
  cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" "$@"
fi
echo "[build] building with $(nproc) jobs"
start=$(date +%s)
cmake --build "$BUILD" -j "$(nproc)"
echo "[build] done in $(( $(date +%s) - start )) s"
