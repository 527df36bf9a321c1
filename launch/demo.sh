#!/usr/bin/env bash
# The main job on the embedded default (configs/vmoe-tiny.yaml) with 2 ranks:
# pretrain on Fashion-MNIST classes 0-4 (cached in runs/vmoe-tiny between runs),
# then fine-tune on classes 5-9 recording router history. Sets up and builds first
# when needed. Extra arguments go to both commands (e.g. --set finetune.steps=100).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/build.sh"
cd "$ROOT"
start=$(date +%s)
echo "[demo] 1/2 pretrain vmoe-tiny on the source task (Fashion-MNIST classes 0-4), 2 ranks"
launch/mpirun.sh -np 2 build/moeprune pretrain --skip-if-done "$@"
echo "[demo] 2/2 fine-tune on the downstream task (classes 5-9), recording router history, 2 ranks"
launch/mpirun.sh -np 2 build/moeprune finetune "$@"
echo "[demo] done in $(( $(date +%s) - start )) s; outputs in runs/vmoe-tiny (metrics.jsonl, router_history.json, *.safetensors)"
