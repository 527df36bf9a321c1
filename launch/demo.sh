#!/usr/bin/env bash
# The main job on the embedded default (configs/vmoe-tiny.yaml) with 2 ranks, as
# one `moeprune run`: pretrain on the broad source task (four planted lookup tasks;
# cached in runs/vmoe-tiny between runs), fine-tune on the narrow downstream task
# (task 0) recording router history, report what the experts contribute (accuracy
# with every expert zeroed) and their downstream loads, prune 50% of the experts
# globally by router_norm_change (zero routing, the paper's), rebalance, re-fine-tune
# briefly, evaluate; prints the pruning report and draws its pictures. Sets up and
# builds first when needed. Extra arguments go to `moeprune run` (e.g.
# --set finetune.steps=100).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/launch/build.sh"
cd "$ROOT"
start=$(date +%s)
echo "[demo] moeprune run on 2 ranks: pretrain (cached) -> finetune -> prune -> rebalance -> re-fine-tune"
launch/mpirun.sh -np 2 build/moeprune run "$@"
pngs=$(.venv/bin/python launch/plot_prune.py runs/vmoe-tiny/prune_report.json 2>&1) || pngs="(no pictures: $pngs)"
summary=$(.venv/bin/python - runs/vmoe-tiny/prune_report.json <<'PY' 2>&1
import json, sys
r = json.load(open(sys.argv[1]))
b, z, a = (100 * r[k] for k in ("test_accuracy_before", "test_accuracy_experts_zeroed", "test_accuracy_after"))
print(f"[demo] what the experts contribute: downstream test accuracy {b:.2f}% fine-tuned, {z:.2f}% with every "
      f"expert's output zeroed ({b - z:.2f} pt)")
for l in r["layers"]:
    load = l["calibration_load"]
    print(f"[demo] block {l['block']}: pruned experts {','.join(map(str, l['pruned'])) or '-'} of {l['experts_before']}; "
          f"downstream load per expert {min(load)}..{max(load)} tokens")
rt = r.get("refinetune") or {}
tail = f", {100 * rt['test_accuracy']:.2f}% after re-fine-tuning" if rt else ""
print(f"[demo] pruned {100 * r['ratio']:.1f}% by {r['criterion']} ({r['routing']} routing): {a:.2f}%{tail}")
PY
) || summary="[demo] (no summary: $summary)"
echo "$summary"
echo "[demo] done in $(( $(date +%s) - start )) s; outputs in runs/vmoe-tiny: prune_report.json, metrics.jsonl,"
echo "[demo] router_history.json, pretrained/finetuned model files, checkpoints/ (build/moeprune ckpt inspect runs/vmoe-tiny/checkpoints)"
echo "[demo] pictures: $pngs"
