#!/usr/bin/env bash
# Resume on another number of ranks and another process mesh. A 12-step run saves
# checkpoints every 4 steps; resuming its step-4 checkpoint on the other world size
# or mesh must end at the uninterrupted run's weights. A mesh is written
# RANKS:N: RANKS ranks in RANKS/N expert-data-parallel groups of N expert-parallel
# ranks (N = 0: auto). Tolerance 1e-5 relative (max |a-b| / max |b| per tensor):
# routing groups are identical, only float32 reduction order differs between
# meshes (~1e-7); after 8 SGD steps we see ~1e-6.
# Also: the run on the 2 x 2 mesh equals the single-process run (training on a
# mesh = one process), and its checkpoints hold every expert exactly once.
# usage: ckpt_reshard.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" reshard "$1" "$2"
CMP="$(dirname "$BIN")/tests/st_compare"
pass=0; failed=0
check() {  # check NAME COMMAND...: counts a pass or a failure
  local name=$1; shift
  if "$@"; then echo "ok: $name"; pass=$((pass + 1)); else echo "FAIL: $name"; failed=$((failed + 1)); fi
}
# full RANKS:N: the uninterrupted run on that mesh (once), its directory in $A.
full() {
  local np=${1%%:*} ep=${1##*:}
  A="$W/full-$np-$ep"
  [ -f "$A/pretrained.safetensors" ] && return 0
  "${MPI[@]}" -np "$np" "$BIN" pretrain --config "$CFG" --set output.dir="$A" --set parallel.expert_parallel="$ep" \
    > "$W/a.log" 2>&1 || { cat "$W/a.log"; echo "FAIL: run on mesh $1"; exit 1; }
}
for pair in "2:0 4:0" "4:0 2:0" "1:0 3:0" "4:2 2:2" "4:2 4:1" "4:2 3:0" "2:1 4:2"; do
  set -- $pair
  full "$1"
  from_np=${1%%:*}; to_np=${2%%:*}; to_ep=${2##*:}
  B="$W/resumed-${1/:/-}-${2/:/-}"
  ck=$(ls -d "$A"/checkpoints/ckpt-*-step00000004)
  "${MPI[@]}" -np "$to_np" "$BIN" pretrain --config "$CFG" --set output.dir="$B" --set checkpoint.every=0 \
    --set parallel.expert_parallel="$to_ep" --resume "$ck" > "$W/b.log" 2>&1 \
    || { cat "$W/b.log"; echo "FAIL: resume on mesh $2"; exit 1; }
  grep -q "saved on $from_np ranks) at step 4" "$W/b.log" || { cat "$W/b.log"; echo "FAIL: no resume message"; exit 1; }
  if [ "$to_ep" -gt 0 ] && [ "$to_np" -gt "$to_ep" ]; then
    grep -q "mesh: $to_np ranks = $((to_np / to_ep)) expert-data-parallel groups x $to_ep expert-parallel" "$W/b.log" \
      || { cat "$W/b.log"; echo "FAIL: no mesh line"; exit 1; }
  fi
  check "mesh $1 -> $2" "$CMP" "$B/pretrained.safetensors" "$A/pretrained.safetensors" 1e-5
done
full 1:0
one="$A"
full 4:2
check "mesh 4:2 (2 x 2) = one process" "$CMP" "$A/pretrained.safetensors" "$one/pretrained.safetensors" 1e-5
# The 2 x 2 checkpoint: two expert shards (group 0), every expert once, verified.
ck=$(ls -d "$A"/checkpoints/ckpt-*-step00000008)
python3 - "$ck/manifest.json" <<'EOF' || { echo "FAIL: manifest of the 2 x 2 mesh"; failed=$((failed + 1)); }
import json, sys
m = json.load(open(sys.argv[1]))
assert m["world_size"] == 4 and m["expert_parallel"] == 2, (m["world_size"], m["expert_parallel"])
assert [s["rank"] for s in m["shards"]] == [0, 1], m["shards"]
for block in ("1", "3"):
    ids = sorted(i for s in m["shards"] for i in s["experts"][block])
    assert ids == [0, 1, 2, 3], (block, ids)
print("ok: the 2 x 2 checkpoint lists 2 shards, every expert once")
EOF
check "ckpt verify of the 2 x 2 checkpoint" "$BIN" ckpt verify "$ck"
echo "$pass passed, $failed failed"
[ "$failed" -eq 0 ]
