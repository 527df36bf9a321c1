#!/usr/bin/env bash
# The main job on the embedded default (configs/vmoe-tiny.yaml) with 2 ranks, as
# one `moeprune run`: pretrain on Fashion-MNIST classes 0-4 (cached in
# runs/vmoe-tiny between runs), fine-tune on classes 5-9 recording router history,
# prune 50% of the experts globally by router_norm_change, rebalance, re-fine-tune
# briefly, evaluate; prints the pruning report. Sets up and builds first when
# needed. Extra arguments go to `moeprune run` (e.g. --set finetune.steps=100).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/build.sh"
cd "$ROOT"
start=$(date +%s)
echo "[demo] moeprune run on 2 ranks: pretrain (cached) -> finetune -> prune -> rebalance -> re-fine-tune"
launch/mpirun.sh -np 2 build/moeprune run "$@"
pngs=$(.venv/bin/python launch/plot_prune.py runs/vmoe-tiny/prune_report.json 2>&1) || pngs="(no pictures: $pngs)"
echo "[demo] done in $(( $(date +%s) - start )) s; outputs in runs/vmoe-tiny: prune_report.json, metrics.jsonl,"
echo "[demo] router_history.json, pretrained/finetuned model files, checkpoints/ (build/moeprune ckpt inspect runs/vmoe-tiny/checkpoints)"
echo "[demo] pictures: $pngs"
