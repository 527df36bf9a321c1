#!/usr/bin/env bash
# In-memory hand-over between phases equals reloading from disk: `moeprune run`
# (pretrain -> finetune -> prune -> refinetune in one process, handing the model,
# optimiser state and router history over in memory) against the same phases run
# one command at a time (each loading the previous phase's model file or
# checkpoint). Metrics, pruning report and re-fine-tuned accuracy must be equal
# bit for bit.
# usage: pipeline_handover.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" handover "$1" "$2"
SET=(--set refinetune.enabled=true --set refinetune.steps=6 --set refinetune.batch_size=24 --set prune.eval_top_k=1)

"${MPI[@]}" -np 2 "$BIN" run --config "$CFG" --set output.dir="$W/a" "${SET[@]}" > "$W/a.log" 2>&1 \
  || { cat "$W/a.log"; fail "one-process run"; }
grep -q "starting from the pretrained model of this job" "$W/a.log" || { cat "$W/a.log"; fail "fine-tuning did not start from memory"; }
for cmd in pretrain finetune prune refinetune; do
  only=()  # `moeprune prune` re-fine-tunes in the same process when enabled: not here
  [ "$cmd" = prune ] && only=(--set refinetune.enabled=false)
  "${MPI[@]}" -np 2 "$BIN" "$cmd" --config "$CFG" --set output.dir="$W/b" "${SET[@]}" "${only[@]}" >> "$W/b.log" 2>&1 \
    || { cat "$W/b.log"; fail "moeprune $cmd"; }
done
grep -q "loaded .*pretrained.safetensors" "$W/b.log" || { cat "$W/b.log"; fail "finetune did not load the model file"; }
python3 - "$W/a" "$W/b" <<'PY' || fail "the two ways differ"
import json, sys
a, b = sys.argv[1:3]
def metrics(d):
    out = []
    for line in open(d + "/metrics.jsonl"):
        r = json.loads(line)
        for k in ("images_per_s", "tokens_per_s", "step_time_s", "peak_rss_mib", "train_images_per_s", "seconds"):
            r.pop(k, None)
        out.append(r)
    return out
ma, mb = metrics(a), metrics(b)
assert ma == mb, next((x, y) for x, y in zip(ma, mb) if x != y) if len(ma) == len(mb) else (len(ma), len(mb))
ra, rb = (json.load(open(d + "/prune_report.json")) for d in (a, b))
for k in ra:
    if k in ("checkpoint_in", "checkpoint_out"):
        continue
    assert ra[k] == rb[k], (k, ra[k], rb[k])
print("equal:", len(ma), "metrics records; report", ra["test_accuracy_before"], ra["test_accuracy_after"],
      ra["refinetune"]["test_accuracy"])
PY
echo "ok: the one-process run equals the phases run one command at a time"
echo "1 passed, 0 failed"
