#!/usr/bin/env bash
# Resume on another number of ranks (2 -> 4, 4 -> 2, 1 -> 3): a 12-step run saves
# checkpoints every 4 steps; resuming its step-4 checkpoint on the other world size
# must end at the uninterrupted run's weights. Tolerance 1e-5 relative (max |a-b| /
# max |b| per tensor): routing groups are identical, only float32 reduction order
# differs between world sizes (~1e-7); after 8 SGD steps we see ~1e-6.
# usage: ckpt_reshard.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" reshard "$1" "$2"
CMP="$(dirname "$BIN")/tests/st_compare"
pass=0; failed=0
for pair in "2 4" "4 2" "1 3"; do
  set -- $pair
  from=$1; to=$2
  A="$W/full-$from"; B="$W/resumed-$from-$to"
  "${MPI[@]}" -np "$from" "$BIN" pretrain --config "$CFG" --set output.dir="$A" > "$W/a.log" 2>&1 \
    || { cat "$W/a.log"; echo "FAIL: run on $from ranks"; exit 1; }
  ck=$(ls -d "$A"/checkpoints/ckpt-*-step00000004)
  "${MPI[@]}" -np "$to" "$BIN" pretrain --config "$CFG" --set output.dir="$B" --set checkpoint.every=0 \
    --resume "$ck" > "$W/b.log" 2>&1 || { cat "$W/b.log"; echo "FAIL: resume on $to ranks"; exit 1; }
  grep -q "saved on $from ranks) at step 4" "$W/b.log" || { cat "$W/b.log"; echo "FAIL: no resume message"; exit 1; }
  if "$CMP" "$B/pretrained.safetensors" "$A/pretrained.safetensors" 1e-5; then
    echo "ok: $from -> $to ranks"; pass=$((pass + 1))
  else
    echo "FAIL: $from -> $to ranks"; failed=$((failed + 1))
  fi
done
echo "$pass passed, $failed failed"
[ "$failed" -eq 0 ]
