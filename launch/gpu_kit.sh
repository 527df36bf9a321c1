#!/usr/bin/env bash
# Builds and checks moeprune on a GPU machine that has CUDA, CMake, ninja and a
# python3 with torch 2.11 but none of the Debian packages moeprune needs and no
# network (the lent H100/H200 machines).
#
#   launch/gpu_kit.sh fetch    # here, with Debian's apt: .debs into .gpukit/ (git-ignored)
#   launch/gpu_kit.sh pack     # here, optional: copy this machine's CUDA build (same torch
#                              # 2.11.0+cu130 wheel), the Fashion-MNIST files and the vmoe
#                              # test fixtures (../shared/fixtures) into .gpukit/,
#                              # so that the GPU machine spends its time running, not compiling
#   launch/gpu_kit.sh build    # there: unpack; build build-gpu/ unless .gpukit/build was packed
#   launch/gpu_kit.sh check    # there: GPU tests, CPU-vs-GPU checks, benchmarks; logs into $OUT
#   eval "$(launch/gpu_kit.sh env)"   # there: PATH etc. for running the binaries by hand
#
# Environment: GPUKIT_ROOT (default /tmp/gpukit), TORCH_PYTHON (default python3),
# MOEPRUNE_BUILD_DIR (default: .gpukit/build when packed, else build-gpu),
# CMAKE_CUDA_ARCHITECTURES (default 90), GPUKIT_BUDGET_S (check: skip the steps that
# would start after this many seconds; default 420).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="${GPUKIT_ROOT:-/tmp/gpukit}"
DEBS="$ROOT/.gpukit"
PACKED="$DEBS/build"
if [ -n "${MOEPRUNE_BUILD_DIR:-}" ]; then BUILD="$MOEPRUNE_BUILD_DIR"
elif [ -x "$PACKED/moeprune" ]; then BUILD="$PACKED"
else BUILD="$ROOT/build-gpu"; fi
PY="${TORCH_PYTHON:-python3}"
PKGS=(libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common libevent-core-2.1-7 libevent-pthreads-2.1-7
      libhwloc15 libpmix2 libmunge2 libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libyaml-cpp-dev libyaml-cpp0.7
      libcli11-dev nlohmann-json3-dev libgtest-dev zlib1g-dev libudev1)
LIB="$KIT/usr/lib/x86_64-linux-gnu"

env_lines() {
  echo "export OPAL_PREFIX='$KIT/usr'"
  echo "export PATH='$KIT/usr/bin':\"\$PATH\""
  # torch's own libraries and the CUDA wheels beside it (NCCL, cudart, cuBLAS): a packed
  # build's run path names this machine's .venv, which is not there.
  local tl
  tl="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)"
  local extra=""
  if [ -n "$tl" ]; then
    extra="$tl/lib"
    for d in "$tl"/../nvidia/*/lib; do [ -d "$d" ] && extra="$extra:$(cd "$d" && pwd)"; done
  fi
  echo "export LD_LIBRARY_PATH='$LIB:$LIB/openmpi/lib:$extra':\"\${LD_LIBRARY_PATH:-}\""
  echo "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
  # Shared memory only: the kit has no UCX, libfabric or verbs for Open MPI's network plugins.
  echo "export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_osc=^ucx OMPI_MCA_mtl=^ofi"
  echo "export OMPI_MCA_mca_base_component_show_load_errors=0 PMIX_MCA_pcompress_base_silence_warning=1"
}

case "${1:-}" in
  fetch)
    mkdir -p "$DEBS"
    (cd "$DEBS" && apt-get download "${PKGS[@]}")
    du -sh "$DEBS"
    echo "[gpu_kit] carry .gpukit (and nothing built here) to the GPU machine"
    ;;
  pack)
    [ -d "$DEBS" ] || { echo "gpu_kit: run 'launch/gpu_kit.sh fetch' first" >&2; exit 2; }
    src="${2:-$ROOT/build}"
    for b in moeprune tests/moeprune_tests tests/moeprune_mpi_tests tests/st_compare tests/abort_probe bench/moeprune-bench; do
      [ -x "$src/$b" ] || { echo "gpu_kit: $src/$b missing: build first (launch/build.sh)" >&2; exit 2; }
    done
    ldd "$src/moeprune" | grep -q libtorch_cuda || { echo "gpu_kit: $src was built without the CUDA path" >&2; exit 2; }
    rm -rf "$PACKED" && mkdir -p "$PACKED/tests" "$PACKED/bench" "$DEBS/data"
    for b in moeprune tests/moeprune_tests tests/moeprune_mpi_tests tests/st_compare tests/abort_probe bench/moeprune-bench; do
      strip -o "$PACKED/$b" "$src/$b"
    done
    cp /usr/share/datasets/fashion-mnist/*.gz "$DEBS/data/"
    # The vmoe fixtures (the importer's oracle, ../shared beside the checkout here),
    # which do not travel with the working tree.
    if [ -d "$ROOT/../shared/fixtures" ]; then
      rm -rf "$DEBS/shared" && mkdir -p "$DEBS/shared" && cp -r "$ROOT/../shared/fixtures" "$DEBS/shared/"
    fi
    du -sh "$DEBS"
    echo "[gpu_kit] packed $src: carry .gpukit; there 'launch/gpu_kit.sh build' only unpacks"
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
    if [ "$BUILD" = "$PACKED" ]; then
      echo "[gpu_kit] using the packed build in $PACKED"
      missing="$(ldd "$BUILD/moeprune" | grep 'not found' || true)"
      [ -z "$missing" ] || { echo "gpu_kit: libraries not found: $missing" >&2; exit 1; }
      exit 0
    fi
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
    exec "$ROOT/launch/gpu_check.sh" "$BUILD" "$out" "${@:2}"
    ;;
  *)
    sed -n '2,17p' "$0" >&2
    exit 2
    ;;
esac
