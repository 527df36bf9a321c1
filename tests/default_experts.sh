#!/usr/bin/env bash
# The embedded default is a task where the experts matter (issue 14): the whole job
# (pretrain -> fine-tune -> prune 50% by router_norm_change, zero routing; no
# re-fine-tuning) on 2 ranks, then from its report:
#  - zeroing every expert's output costs at least 5 points of downstream accuracy
#    (the old Fashion-MNIST default: 0.00);
#  - the downstream task leaves some expert nearly idle (calibration load below 5% of
#    its layer's busiest): there are experts a criterion can find;
#  - pruning half the experts by router_norm_change keeps the accuracy within 3 points
#    (docs/results.md: 0.6-1.4 points over fine-tuning seeds 0-3; every expert zeroed:
#    7.3-13.8).
# The zeroing bar was 10 points, met by 2 of those 4 seeds: a change of float
# rounding alone (the patch embedding as one GEMM, the one-pass optimiser, issue 15)
# drew seed 0 at 8.96 (seeds 0-3 with that code: 8.96, 6.94, 9.63, 8.57; pruning
# half: -0.10 to 0.58 points). 5 points is below every one of the 8 measured runs and
# still separates a default whose experts matter from one whose experts do nothing.
# The idle-expert check is a property of this run (seed 0), not of every seed: with
# seeds 1 and 3 the least-loaded expert had 43% and 33% of its layer's busiest.
# About 60-90 s on 2 idle cores.
source "$(dirname "$0")/cli_common.sh" default_experts "$@"
"${MPI[@]}" -np 2 "$BIN" run --set output.dir="$W/run" --set refinetune.enabled=false --set checkpoint.every=0 \
  > "$W/run.log" 2>&1 || { tail -20 "$W/run.log"; fail "the default job"; }
grep -q "what the experts contribute" "$W/run.log" || fail "the report does not say what the experts contribute"
python3 - "$W/run/prune_report.json" <<'PY' || fail "the default's experts do not matter as they should (above)"
import json, sys
r = json.load(open(sys.argv[1]))
before, zeroed, after = (100 * r[k] for k in ("test_accuracy_before", "test_accuracy_experts_zeroed", "test_accuracy_after"))
idle = min(min(l["calibration_load"]) / max(l["calibration_load"]) for l in r["layers"])
print(f"fine-tuned {before:.2f}%, every expert zeroed {zeroed:.2f}% ({before - zeroed:.2f} pt), "
      f"50% pruned by {r['criterion']} ({r['routing']} routing) {after:.2f}%; least-loaded expert / busiest: {idle:.4f}")
ok = True
if before - zeroed < 5:
    print(f"FAIL: zeroing every expert costs {before - zeroed:.2f} pt, expected at least 5"); ok = False
if idle >= 0.05:
    print(f"FAIL: no nearly idle expert on the downstream task (least / busiest {idle:.3f}, expected < 0.05)"); ok = False
if before - after > 3:
    print(f"FAIL: pruning half the experts by {r['criterion']} costs {before - after:.2f} pt, expected at most 3"); ok = False
sys.exit(0 if ok else 1)
PY
echo "PASS: default_experts"
