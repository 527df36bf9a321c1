#!/usr/bin/env bash
# `moeprune prune` through the command line (registered in ctest):
#  1. fine-tune on 2 ranks, prune 50% globally on 4 ranks (another world size), then
#     re-fine-tune the pruned checkpoint (uneven experts per layer) on 2 ranks with
#     SEER-MoE's entropy regulariser and top-1 evaluation: report, checkpoint verifies;
#  2. bad input gives exit code 2 and a clear message, and changes no checkpoint:
#     a ratio that leaves fewer than top_k experts, an unknown criterion, an empty
#     calibration split.
# usage: prune_cli.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" prune "$1" "$2"
OUT="$W/run"
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" > "$W/p.log" 2>&1 || { cat "$W/p.log"; fail "pretrain"; }
"${MPI[@]}" -np 2 "$BIN" finetune --config "$CFG" --set output.dir="$OUT" > "$W/f.log" 2>&1 || { cat "$W/f.log"; fail "finetune"; }
FT=$(cat "$OUT/checkpoints/latest")

expect_error() {  # message args...
  msg="$1"; shift
  before=$(cat "$OUT/checkpoints/latest"; ls "$OUT/checkpoints")
  "${MPI[@]}" -np 2 "$BIN" prune --config "$CFG" --set output.dir="$OUT" --from "$OUT/checkpoints/$FT" "$@" \
    > "$W/e.log" 2>&1
  rc=$?
  [ "$rc" -eq 2 ] || { cat "$W/e.log"; fail "prune $*: exit code $rc, expected 2"; }
  grep -q -- "$msg" "$W/e.log" || { cat "$W/e.log"; fail "prune $*: no message '$msg'"; }
  after=$(cat "$OUT/checkpoints/latest"; ls "$OUT/checkpoints")
  [ "$before" = "$after" ] || fail "prune $*: the checkpoints changed"
  echo "ok: prune $* -> exit 2: $msg"
}
expect_error "would leave some MoE layer with fewer than max(top_k=2" --set prune.ratio=0.9
grep -q "test accuracy before pruning" "$W/e.log" && fail "an impossible ratio was refused only after evaluating"
expect_error "prune.criterion='loudest', expected one of" --set prune.criterion=loudest
expect_error "finetune/val split of planted is empty" --set data.val_fraction=0
expect_error "was fine-tuned on planted classes all label map all, image size 8; this config's" \
  --set model.image_size=12

"${MPI[@]}" -np 4 "$BIN" prune --config "$CFG" --set output.dir="$OUT" --from "$OUT/checkpoints" \
  --set prune.ratio=0.5 --set "prune.layers=[1]" > "$W/ok.log" 2>&1 || { cat "$W/ok.log"; fail "prune on 4 ranks"; }
grep -q "pruning report: router_norm_change, global scope, drop routing, 4 ranks" "$W/ok.log" || { cat "$W/ok.log"; fail "no report"; }
# The pruned checkpoint (saved on 4 ranks, uneven experts per layer) re-fine-tuned on 2 ranks.
"${MPI[@]}" -np 2 "$BIN" refinetune --config "$CFG" --set output.dir="$OUT" --set refinetune.steps=4 \
  --set refinetune.batch_size=24 --set refinetune.router_entropy_weight=0.01 --set prune.eval_top_k=1 \
  > "$W/rf.log" 2>&1 || { cat "$W/rf.log"; fail "refinetune on 2 ranks"; }
grep -q "starting from the pruned model" "$W/rf.log" || { cat "$W/rf.log"; fail "refinetune did not load the pruned model"; }
python3 - "$OUT/prune_report.json" <<'PY' || fail "report content"
import json, sys
r = json.load(open(sys.argv[1]))
assert [l["experts_after"] for l in r["layers"]] == [2, 4], r["layers"]  # uneven: only block 1 was eligible
assert r["params_after"] < r["params_before"]
assert r["refinetune"]["eval_top_k"] == 1 and 0 <= r["refinetune"]["test_accuracy_eval_top_k"] <= 1
PY
"$BIN" ckpt verify "$OUT/checkpoints" > /dev/null || fail "pruned checkpoint does not verify"
"$BIN" ckpt inspect "$OUT/checkpoints" | grep -q "phase refinetune" || fail "latest checkpoint is not the re-fine-tuned one"
echo "ok: pruned on 4 ranks a model fine-tuned on 2, re-fine-tuned on 2, report and checkpoint verified"

# Workflow: with checkpoint.keep 1 and checkpoints every 4 steps, one `run` leaves each
# phase's final checkpoint (retention counts within a phase), no duplicate of a final
# step, and `prune --from ROOT` finds the fine-tuning checkpoint although later
# phases saved after it.
OUT2="$W/keep"
"${MPI[@]}" -np 2 "$BIN" run --config "$CFG" --set output.dir="$OUT2" --set checkpoint.keep=1 \
  --set refinetune.batch_size=24 --set refinetune.steps=4 > "$W/run.log" 2>&1 || { cat "$W/run.log"; fail "run"; }
names=$(ls "$OUT2/checkpoints" | grep '^ckpt-')
for p in pretrain finetune prune; do   # (re-fine-tuning is off in this config)
  [ "$(echo "$names" | grep -c -- "-$p-step")" -eq 1 ] || { echo "$names"; fail "keep 1: not one checkpoint of $p"; }
done
dups=$(echo "$names" | sed 's/^ckpt-[0-9]*-//' | sort | uniq -d)
[ -z "$dups" ] || fail "duplicate checkpoints of one step: $dups"
"${MPI[@]}" -np 2 "$BIN" prune --config "$CFG" --set output.dir="$OUT2" --from "$OUT2/checkpoints" \
  > "$W/again.log" 2>&1 || { cat "$W/again.log"; fail "prune --from ROOT after the whole job"; }
grep -q "prune: loaded .*-finetune-step" "$W/again.log" || { cat "$W/again.log"; fail "prune --from ROOT: not the fine-tuning checkpoint"; }
echo "ok: keep 1 keeps every phase's final checkpoint, no duplicate, prune --from ROOT after the job"
echo "5 passed, 0 failed"
