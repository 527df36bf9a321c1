#!/usr/bin/env bash
# `moeprune prune` through the command line (registered in ctest):
#  1. fine-tune on 2 ranks, prune 50% globally on 4 ranks (another world size), then
#     re-fine-tune the pruned checkpoint (uneven experts per layer) on 2 ranks with
#     SEER-MoE's entropy regulariser and top-1 evaluation: report, checkpoint verifies;
#  2. bad input gives exit code 2 and a clear message, and changes no checkpoint:
#     a ratio that leaves fewer than top_k experts, an unknown criterion, an empty
#     calibration split, replica options that cannot hold;
#  3. hot-expert replicas on 2 ranks (prune.replicate).
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
expect_error "prune.ratio=auto and prune.count=3 both choose" --set prune.ratio=auto --set prune.count=3
expect_error "prune.max_accuracy_drop=-1 must be in" --set prune.ratio=auto --set prune.max_accuracy_drop=-1
expect_error "finetune/val split of planted is empty" --set data.val_fraction=0
expect_error "was fine-tuned on planted classes all label map all, image size 8; this config's" \
  --set model.image_size=12
expect_error "prune.replicate needs prune.rebalance: true" --set prune.replicate=true --set prune.rebalance=false
expect_error "prune.replica_memory_mb=0.001 holds no replica: one expert copy in each of 2 MoE layers" \
  --set prune.replicate=true --set prune.replica_memory_mb=0.001
expect_error "prune.replica_imbalance=0.5 must be >= 1" --set prune.replicate=true --set prune.replica_imbalance=0.5

# Hot-expert replicas: the same plan on 2 ranks without and with prune.replicate (room
# for many copies): the same test accuracy (copies hold the same weights), every layer's
# expected imbalance at most 1.10 and never above the plain rebalancer's; each expert
# once in the checkpoint; the replicated model re-fine-tunes on 2 ranks.
for rep in false true; do
  "${MPI[@]}" -np 2 "$BIN" prune --config "$CFG" --set output.dir="$W/rep-$rep" --from "$OUT/checkpoints/$FT" \
    --set prune.ratio=0.25 --set prune.replicate=$rep --set prune.replica_memory_mb=1 > "$W/rep-$rep.log" 2>&1 \
    || { cat "$W/rep-$rep.log"; fail "prune replicate=$rep"; }
done
grep -q "imb after replicas" "$W/rep-true.log" || { cat "$W/rep-true.log"; fail "no replicas column"; }
python3 - "$W/rep-false/prune_report.json" "$W/rep-true/prune_report.json" <<'PY' || { cat "$W/rep-true.log"; fail "replica report"; }
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
assert [l["kept"] for l in a["layers"]] == [l["kept"] for l in b["layers"]], "not the same plan"
assert abs(a["test_accuracy_after"] - b["test_accuracy_after"]) <= 1 / 128 + 1e-12, (a["test_accuracy_after"], b["test_accuracy_after"])
assert any(l["replicas_after"] > 0 for l in b["layers"]), b["layers"]
for la, lb in zip(a["layers"], b["layers"]):
    assert la["replicas_after"] == 0
    assert lb["imbalance_after"] <= 1.10 + 1e-9 and lb["imbalance_after"] <= la["imbalance_after"] + 1e-9, (la, lb)
    copies = lb["copies_after"]
    assert len(copies) == lb["experts_after"] and all(len(set(c)) == len(c) >= 1 for c in copies), copies
    assert lb["replicas_after"] == sum(len(c) - 1 for c in copies)
    assert [c[0] for c in copies] == lb["placement_after"]
print("replicas:", [(l["block"], l["experts_after"], round(la["imbalance_after"], 3), round(l["imbalance_after"], 3),
                     l["replicas_after"]) for la, l in zip(a["layers"], b["layers"])])
PY
"$BIN" ckpt verify "$W/rep-true/checkpoints" > /dev/null || fail "replicated checkpoint does not verify"
"${MPI[@]}" -np 2 "$BIN" refinetune --config "$CFG" --set output.dir="$W/rep-true" --set refinetune.steps=4 \
  --set refinetune.batch_size=24 > "$W/rep-rf.log" 2>&1 || { cat "$W/rep-rf.log"; fail "refinetune with replicas"; }
"$BIN" ckpt verify "$W/rep-true/checkpoints" > /dev/null || fail "re-fine-tuned replicated checkpoint does not verify"
echo "ok: replicas: same accuracy, imbalance <= 1.10, each expert saved once, re-fine-tuned on 2 ranks"

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
assert 0 <= r["test_accuracy_experts_zeroed"] <= 1, r["test_accuracy_experts_zeroed"]
for l in r["layers"]:  # per-expert downstream load and router norm change, every expert of the layer
    assert len(l["calibration_load"]) == l["experts_before"] and sum(l["calibration_load"]) > 0, l
    assert len(l["router_norm_change"]) == l["experts_before"], l
    if r["criterion"] == "router_norm_change":
        assert l["router_norm_change"] == l["scores"], l
assert r["refinetune"]["eval_top_k"] == 1 and 0 <= r["refinetune"]["test_accuracy_eval_top_k"] <= 1
PY
"$BIN" ckpt verify "$OUT/checkpoints" > /dev/null || fail "pruned checkpoint does not verify"

# prune.ratio: auto, zero and drop routing. Candidates are evaluated by masking the
# unpruned model on the calibration split; with the test split (whole) as the
# calibration split, the masked accuracy of the chosen ratio must be the accuracy of
# the model that was really pruned (oracle: masking = pruning), and the chosen ratio
# the largest candidate within the budget (the rule, recomputed here).
# (On this small planted model pruning costs 0 pt with zero routing and 1.56 pt
# with drop routing at every candidate: budget 2 takes the largest, budget 1 none.)
for case in zero:2 drop:1; do
  routing=${case%%:*} budget=${case##*:}
  OUTA="$W/auto-$routing"
  "${MPI[@]}" -np 2 "$BIN" prune --config "$CFG" --set output.dir="$OUTA" --from "$OUT/checkpoints/$FT" \
    --set prune.ratio=auto --set prune.max_accuracy_drop=$budget --set prune.auto_step=0.125 --set prune.routing=$routing \
    --set prune.calibration.split=test --set prune.calibration.batches=0 > "$W/auto.log" 2>&1 \
    || { cat "$W/auto.log"; fail "prune ratio auto ($routing)"; }
  grep -q "ratio auto: within $budget.00 pt" "$W/auto.log" || { cat "$W/auto.log"; fail "no ratio auto table ($routing)"; }
  python3 - "$OUTA/prune_report.json" "$budget" <<'PY' || { cat "$W/auto.log"; fail "ratio auto report ($routing)"; }
import json, sys
r = json.load(open(sys.argv[1]))
a = r["ratio_auto"]
pts = a["candidates"]
assert [p["ratio"] for p in pts] == [0.125 * i for i in range(1, len(pts) + 1)], pts
assert len(pts) >= 3, pts
budget = float(sys.argv[2])
assert a["max_accuracy_drop"] == budget
ok = [p["ratio"] for p in pts if 100 * (a["unpruned_accuracy"] - p["accuracy"]) <= budget + 1e-9]
assert a["chosen"] == (max(ok) if ok else 0) and r["ratio"] == a["chosen"], (a, ok)
assert abs(a["unpruned_accuracy"] - r["test_accuracy_before"]) < 1e-12, (a, r["test_accuracy_before"])
if a["chosen"] > 0:
    chosen = [p for p in pts if p["ratio"] == a["chosen"]][0]
    assert chosen["pruned"] == sum(len(l["pruned"]) for l in r["layers"]), (chosen, r["layers"])
    # masking = pruning: one test image is 1/5000 of accuracy; allow none
    assert abs(chosen["accuracy"] - r["test_accuracy_after"]) < 1e-9, (chosen, r["test_accuracy_after"])
else:  # nothing within the budget: nothing pruned, the model unchanged
    assert all(not l["pruned"] for l in r["layers"]) and r["params_after"] == r["params_before"], r["layers"]
    assert abs(r["test_accuracy_after"] - r["test_accuracy_before"]) < 1e-12
print("ratio auto:", r["routing"], "chose", a["chosen"], "of", [(p["ratio"], round(p["accuracy"], 4)) for p in pts],
      "unpruned", a["unpruned_accuracy"])
PY
  echo "ok: prune.ratio auto ($routing): chosen ratio is the largest within the budget, masked = pruned accuracy"
done
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
echo "6 passed, 0 failed"
