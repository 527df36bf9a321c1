#!/usr/bin/env bash
# Pruning sweep on the embedded default (vmoe-tiny): criteria x pruned fraction x
# fine-tuning seeds x scope, each evaluated without and with re-fine-tuning.
# Writes <out>/sweep.csv and <out>/sweep.png (test accuracy against pruned fraction,
# one line per criterion). The pretrained model is trained once (cached).
#
#   launch/sweep.sh [--seeds 3] [--ranks 2] [--out runs/sweep] [--refinetune-steps 100]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS=3; RANKS=2; OUT="$ROOT/runs/sweep"; RSTEPS=100
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    --ranks) RANKS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --refinetune-steps) RSTEPS="$2"; shift 2 ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
done
"$ROOT/launch/build.sh" > /dev/null
cd "$ROOT"
M() { launch/mpirun.sh -np "$RANKS" build/moeprune "$@"; }
mkdir -p "$OUT"
BASE="$OUT/base"
echo "[sweep] pretrain (cached in $BASE)"
M pretrain --skip-if-done --set output.dir="$BASE" --set checkpoint.every=0 > "$OUT/pretrain.log" 2>&1
CSV="$OUT/sweep.csv"
echo "seed,scope,criterion,fraction,test_before,test_after,test_refinetuned,experts_after,imbalance_after" > "$CSV"
for seed in $(seq 1 "$SEEDS"); do
  FT="$OUT/seed-$seed"
  echo "[sweep] seed $seed: fine-tune"
  M finetune --set output.dir="$FT" --set finetune.init="$BASE/pretrained.safetensors" --set finetune.seed="$seed" \
    --set checkpoint.every=0 > "$FT.log" 2>&1
  SRC="$FT/checkpoints/$(cat "$FT/checkpoints/latest")"
  for scope in global per_layer; do
    for frac in 0 0.25 0.5 0.75; do
      for crit in router_norm_change router_delta heavy_hitter soft_count random; do
        # Nothing is pruned at fraction 0: one run stands for every criterion.
        if [ "$frac" = 0 ] && [ "$crit" != router_norm_change ]; then continue; fi
        V="$FT/$scope-$crit-$frac"
        M prune --from "$SRC" --set output.dir="$V" --set checkpoint.dir="$V/checkpoints" --set seed="$seed" \
          --set prune.criterion="$crit" --set prune.scope="$scope" --set prune.ratio="$frac" \
          --set refinetune.enabled=true --set refinetune.steps="$RSTEPS" --set refinetune.seed="$seed" \
          > "$V.log" 2>&1 || { echo "[sweep] FAILED: $V (see $V.log)"; continue; }
        python3 - "$V/prune_report.json" "$seed" "$scope" "$crit" "$frac" >> "$CSV" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
seed, scope, crit, frac = sys.argv[2:6]
crits = ["router_norm_change", "router_delta", "heavy_hitter", "soft_count", "random"] if float(frac) == 0 else [crit]
for c in crits:
    print(",".join(map(str, [seed, scope, c, frac, r["test_accuracy_before"], r["test_accuracy_after"],
                             r["refinetune"]["test_accuracy"], sum(l["experts_after"] for l in r["layers"]),
                             max(l["imbalance_after"] for l in r["layers"])])))
PY
        echo "[sweep] seed $seed $scope $crit $frac: $(tail -1 "$CSV" | cut -d, -f6,7)"
      done
    done
  done
done
"$ROOT/.venv/bin/python" "$ROOT/launch/plot_sweep.py" "$CSV" "$OUT/sweep.png"
echo "[sweep] wrote $CSV and $OUT/sweep.png"
