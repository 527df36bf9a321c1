#!/usr/bin/env bash
# Pruning sweep on the embedded default (or --config): criteria x pruned fraction x
# fine-tuning seeds x pruned routing x scope, each evaluated without and with
# re-fine-tuning; the random criterion is drawn --random-seeds times per fine-tuning
# seed. Writes <out>/sweep.csv and <out>/sweep.png (test accuracy against pruned
# fraction, one line per criterion). The pretrained model is trained once (cached).
#
#   launch/sweep.sh [--seeds 3] [--random-seeds 2] [--ranks 2] [--out runs/sweep]
#                   [--refinetune-steps 200] [--routings "zero drop"] [--scopes global]
#                   [--ratios "0 0.25 0.5 0.625 0.75 0.875"] [--config FILE]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS=3; RSEEDS=2; RANKS=2; OUT="$ROOT/runs/sweep"; RSTEPS=200; ROUTINGS="zero drop"; SCOPES=global
RATIOS="0 0.25 0.5 0.625 0.75 0.875"; CONFIG=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS="$2"; shift 2 ;;
    --random-seeds) RSEEDS="$2"; shift 2 ;;
    --ranks) RANKS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --refinetune-steps) RSTEPS="$2"; shift 2 ;;
    --routings) ROUTINGS="$2"; shift 2 ;;
    --scopes) SCOPES="$2"; shift 2 ;;
    --ratios) RATIOS="$2"; shift 2 ;;
    --config) CONFIG=(--config "$(realpath "$2")"); shift 2 ;;
    *) echo "sweep.sh: unknown argument '$1' (see the header of launch/sweep.sh)"; exit 2 ;;
  esac
done
"$ROOT/launch/build.sh" > /dev/null
cd "$ROOT"
BIN="${MOEPRUNE_BUILD_DIR:-$ROOT/build}/moeprune"
M() { launch/mpirun.sh -np "$RANKS" "$BIN" "$@"; }
mkdir -p "$OUT"
BASE="$OUT/base"
start=$(date +%s)
echo "[sweep] pretrain (cached in $BASE)"
M pretrain ${CONFIG[@]+"${CONFIG[@]}"} --skip-if-done --set output.dir="$BASE" --set checkpoint.every=0 > "$OUT/pretrain.log" 2>&1
CSV="$OUT/sweep.csv"
echo "seed,random_seed,routing,scope,criterion,fraction,test_before,test_after,test_refinetuned,test_experts_zeroed,experts_after,imbalance_after" > "$CSV"
for seed in $(seq 1 "$SEEDS"); do
  FT="$OUT/seed-$seed"
  echo "[sweep] seed $seed: fine-tune"
  M finetune ${CONFIG[@]+"${CONFIG[@]}"} --set output.dir="$FT" --set finetune.init="$BASE/pretrained.safetensors" \
    --set finetune.seed="$seed" --set checkpoint.every=0 > "$FT.log" 2>&1
  SRC="$FT/checkpoints/$(cat "$FT/checkpoints/latest")"
  for routing in $ROUTINGS; do
    for scope in $SCOPES; do
      for frac in $RATIOS; do
        for crit in router_norm_change router_delta heavy_hitter soft_count random; do
          # Nothing is pruned at fraction 0: one run stands for every criterion.
          if [ "$frac" = 0 ] && [ "$crit" != router_norm_change ]; then continue; fi
          draws=1; [ "$crit" = random ] && draws="$RSEEDS"
          for r in $(seq 1 "$draws"); do
            rs=$((seed * 100 + r))   # the random criterion's seed (the job seed; the data do not depend on it)
            V="$FT/$routing-$scope-$crit-$frac-$r"
            M prune ${CONFIG[@]+"${CONFIG[@]}"} --from "$SRC" --set output.dir="$V" --set checkpoint.dir="$V/checkpoints" \
              --set seed="$rs" --set prune.criterion="$crit" --set prune.scope="$scope" --set prune.ratio="$frac" \
              --set prune.routing="$routing" --set refinetune.enabled=true --set refinetune.steps="$RSTEPS" \
              --set refinetune.seed="$seed" > "$V.log" 2>&1 || { echo "[sweep] FAILED: $V (see $V.log)"; continue; }
            python3 - "$V/prune_report.json" "$seed" "$rs" "$routing" "$scope" "$crit" "$frac" >> "$CSV" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
seed, rs, routing, scope, crit, frac = sys.argv[2:8]
crits = ["router_norm_change", "router_delta", "heavy_hitter", "soft_count", "random"] if float(frac) == 0 else [crit]
for c in crits:
    print(",".join(map(str, [seed, rs, routing, scope, c, frac, r["test_accuracy_before"], r["test_accuracy_after"],
                             r["refinetune"]["test_accuracy"], r["test_accuracy_experts_zeroed"],
                             sum(l["experts_after"] for l in r["layers"]),
                             max(l["imbalance_after"] for l in r["layers"])])))
PY
            echo "[sweep] seed $seed $routing $scope $crit $frac ($r): $(tail -1 "$CSV" | cut -d, -f8,9)"
          done
        done
      done
    done
  done
done
rm -rf "$OUT"/seed-*/*/checkpoints   # the pruned models are not needed again (the reports are kept)
"$ROOT/.venv/bin/python" "$ROOT/launch/plot_sweep.py" "$CSV" "$OUT/sweep.png"
echo "[sweep] wrote $CSV and $OUT/sweep.png in $(( $(date +%s) - start )) s"
