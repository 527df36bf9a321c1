#!/usr/bin/env bash
# End-to-end: `moeprune run` on a small config (pretrain -> finetune -> prune ->
# rebalance -> refinetune). One run goes through uninterrupted on 2 ranks; another
# is stopped with SIGTERM in the middle of fine-tuning (exit 75) and resumed with
# --resume auto on 4 ranks arranged as a 2 x 2 process mesh (2 expert-data-parallel
# groups of 2 expert-parallel ranks: fine-tuning, pruning, rebalancing and
# re-fine-tuning all run on the mesh). The final reports must agree: the same
# experts kept in every layer, accuracies within 1 test example.
# usage: pipeline_e2e.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" e2e "$1" "$2"
SET=(--set finetune.steps=600 --set finetune.log_every=50 --set checkpoint.every=50 --set checkpoint.async=true
     --set refinetune.enabled=true --set refinetune.steps=8 --set refinetune.batch_size=24)

"${MPI[@]}" -np 2 "$BIN" run --config "$CFG" --set output.dir="$W/a" "${SET[@]}" > "$W/a.log" 2>&1 \
  || { cat "$W/a.log"; fail "uninterrupted run"; }
grep -q "pruning report" "$W/a.log" || fail "uninterrupted run printed no pruning report"

"${MPI[@]}" -np 2 "$BIN" run --config "$CFG" --set output.dir="$W/b" "${SET[@]}" > "$W/b.log" 2>&1 &
MPIPID=$!
for _ in $(seq 1 600); do  # wait until fine-tuning has made some progress
  grep -q "finetune step 100/600" "$W/b.log" 2>/dev/null && break
  sleep 0.1
done
pkill -TERM -f "^$BIN run --config $CFG --set output.dir=$W/b " || fail "no rank to signal"
wait $MPIPID; rc=$?
[ "$rc" -eq 75 ] || { cat "$W/b.log"; fail "SIGTERM during fine-tuning: exit $rc, expected 75"; }
step=$("$BIN" ckpt inspect "$W/b/checkpoints" | sed -n 's/.*phase finetune, step \([0-9]*\).*/\1/p')
[ -n "$step" ] && [ "$step" -lt 600 ] || fail "the preemption checkpoint is not mid fine-tuning (step '$step')"
"${MPI[@]}" -np 4 "$BIN" run --config "$CFG" --set output.dir="$W/b" "${SET[@]}" --set parallel.expert_parallel=2 \
  --resume auto > "$W/b2.log" 2>&1 || { cat "$W/b2.log"; fail "resumed run on 4 ranks (2 x 2 mesh)"; }
grep -q "mesh: 4 ranks = 2 expert-data-parallel groups x 2 expert-parallel ranks" "$W/b2.log" \
  || { cat "$W/b2.log"; fail "the resumed run is not on the 2 x 2 mesh"; }
grep -q "pruning report: .*4 ranks (2 groups x 2 expert-parallel" "$W/b2.log" \
  || { cat "$W/b2.log"; fail "the pruning report does not name the mesh"; }
"$BIN" ckpt verify "$W/b/checkpoints" > /dev/null || fail "the mesh's last checkpoint does not verify"
grep -q "continuing with finetune" "$W/b2.log" || { cat "$W/b2.log"; fail "did not continue fine-tuning"; }
grep -q "resumed from .*(saved on 2 ranks) at step $step" "$W/b2.log" || { cat "$W/b2.log"; fail "no resume at step $step"; }
python3 - "$W/a/prune_report.json" "$W/b/prune_report.json" <<'PY' || fail "reports differ"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for la, lb in zip(a["layers"], b["layers"]):
    assert la["kept"] == lb["kept"], (la["block"], la["kept"], lb["kept"])
tol = 1.0 / 128 + 1e-9  # one test example
for k in ("test_accuracy_before", "test_accuracy_after"):
    assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])
assert abs(a["refinetune"]["test_accuracy"] - b["refinetune"]["test_accuracy"]) <= tol
print("reports agree:", a["test_accuracy_before"], a["test_accuracy_after"], a["refinetune"]["test_accuracy"])
PY
echo "ok: SIGTERM at fine-tuning step $step, resumed on 4 ranks (2 x 2 mesh), final report equals the uninterrupted run's"
echo "1 passed, 0 failed"
