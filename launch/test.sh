#!/usr/bin/env bash
# Sets up, builds and runs the whole test suite (GoogleTest through ctest,
# multi-rank tests through mpirun with 2 and 4 ranks).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/build.sh"
cd "${MOEPRUNE_BUILD_DIR:-$ROOT/build}"
ctest --output-on-failure --timeout 600 "$@"
