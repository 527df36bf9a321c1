#!/usr/bin/env bash
# The main job on the embedded default (configs/vmoe-tiny.yaml) with 2 ranks.
# Sets up and builds first when needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/build.sh"
echo "[demo] expert-parallel forward/backward smoke of vmoe-tiny on 2 ranks"
"$ROOT/launch/mpirun.sh" -np 2 "$ROOT/build/moeprune" forward "$@"
