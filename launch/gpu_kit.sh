#!/usr/bin/env bash
# Builds and checks moeprune on a GPU machine that has CUDA, CMake, ninja and a
# python3 with torch 2.11 but none of the Debian packages moeprune needs and no
# network (the lent H100/H200 machines). Not yet run on such a machine.
#
#   launch/gpu_kit.sh fetch    # here, with Debian's apt: .debs into .gpukit/ (git-ignored)
#   launch/gpu_kit.sh build    # there: unpack into /tmp/gpukit, configure and build build-gpu/
#   launch/gpu_kit.sh check    # there: GPU tests and benchmarks; logs into $OUT (or gpu-check/)
#   eval "$(launch/gpu_kit.sh env)"   # there: PATH etc. for running build-gpu/ by hand
#
# Environment: GPUKIT_ROOT (default /tmp/gpukit), TORCH_PYTHON (default python3),
# MOEPRUNE_BUILD_DIR (default build-gpu), CMAKE_CUDA_ARCHITECTURES (default 90).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${GPUKIT_ROOT:-/tmp/gpukit}"
DEBS="$ROOT/.gpukit"
BUILD="${MOEPRUNE_BUILD_DIR:-$ROOT/build-gpu}"
PY="${TORCH_PYTHON:-python3}"
PKGS=(libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common libevent-core-2.1-7 libevent-pthreads-2.1-7
      libhwloc15 libpmix2 libmunge2 libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libyaml-cpp-dev libyaml-cpp0.7
      libcli11-dev nlohmann-json3-dev libgtest-dev zlib1g-dev)
LIB="$KIT/usr/lib/x86_64-linux-gnu"

env_lines() {
  echo "export OPAL_PREFIX='$KIT/usr'"
  echo "export PATH='$KIT/usr/bin':\"\$PATH\""
  echo "export LD_LIBRARY_PATH='$LIB:$LIB/openmpi/lib':\"\${LD_LIBRARY_PATH:-}\""
  echo "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
}

case "${1:-}" in
  fetch)
    mkdir -p "$DEBS"
    (cd "$DEBS" && apt-get download "${PKGS[@]}")
    du -sh "$DEBS"
    echo "[gpu_kit] carry .gpukit (and nothing built here) to the GPU machine"
    ;;
  unpack)
    [ -d "$DEBS" ] || { echo "gpu_kit: $DEBS missing: run 'launch/gpu_kit.sh fetch' where apt works" >&2; exit 2; }
    mkdir -p "$KIT"
    for f in "$DEBS"/*.deb; do dpkg -x "$f" "$KIT"; done
    # Debian names the wrappers *.openmpi (update-alternatives makes the plain names).
    for w in mpicxx mpicc mpirun mpiexec; do
      [ -e "$KIT/usr/bin/$w" ] || ln -sf "$w.openmpi" "$KIT/usr/bin/$w"
    done
    ;;
  env) env_lines ;;
  build)
    "$0" unpack
    eval "$(env_lines)"
    TORCH_PREFIX="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
    "$PY" -c 'import torch; print("[gpu_kit] torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
    GEN=()
    command -v ninja >/dev/null && GEN=(-G Ninja)
    cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DMOEPRUNE_CUDA=ON \
      -DCMAKE_PREFIX_PATH="$KIT/usr;$TORCH_PREFIX" -DMPI_CXX_COMPILER="$KIT/usr/bin/mpicxx" \
      -DMPIEXEC_EXECUTABLE="$KIT/usr/bin/mpirun" -DCMAKE_CUDA_ARCHITECTURES="${CMAKE_CUDA_ARCHITECTURES:-90}"
    cmake --build "$BUILD" -j "$(nproc)"
    ;;
  check)
    eval "$(env_lines)"
    out="${OUT:-$ROOT/gpu-check}"
    mkdir -p "$out"
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    set +e
    (cd "$BUILD" && ctest -R 'unit|gpu_kernels|mpi_np1' --output-on-failure) 2>&1 | tee "$out/ctest.log"
    "$BUILD/tests/moeprune_tests" --gtest_filter='Gpu.*' 2>&1 | tee "$out/gpu_tests.log"
    B="$BUILD/bench/moeprune-bench"
    "$B" kernels --repeat 20 2>&1 | tee "$out/bench_kernels.txt"
    "$B" moe --precision bf16 --repeat 5 2>&1 | tee "$out/bench_moe_bf16.txt"
    MOEPRUNE_EXPERT_GEMM=grouped "$B" moe --precision bf16 --repeat 5 2>&1 | tee "$out/bench_moe_bf16_grouped.txt"
    "$B" dispatch --repeat 10 2>&1 | tee "$out/bench_dispatch.txt"
    "$B" step --config "$ROOT/configs/vmoe-s32.yaml" --precision bf16 --repeat 10 2>&1 | tee "$out/bench_step_bf16.txt"
    "$B" step --config "$ROOT/configs/vmoe-s32.yaml" --precision fp32 --repeat 10 2>&1 | tee "$out/bench_step_fp32.txt"
    ;;
  *)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
