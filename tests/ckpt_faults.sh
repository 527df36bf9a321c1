#!/usr/bin/env bash
# Checkpoint fault tests through the command line (registered in ctest):
#  1. SIGTERM to the ranks mid-training: every rank saves, exit code 75; --resume auto finishes.
#  2. SIGKILL of one rank while checkpoints are being written every step: the latest
#     checkpoint verifies, and --resume auto finishes the phase.
# usage: ckpt_faults.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" faults "$1" "$2"
wait_for_ckpts() {  # dir count timeout_s
  for _ in $(seq 1 $(( $3 * 10 ))); do
    n=$(ls -d "$1"/ckpt-* 2>/dev/null | wc -l)
    [ "$n" -ge "$2" ] && return 0
    sleep 0.1
  done
  return 1
}

# 1. SIGTERM
OUT="$W/term"
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" --set pretrain.steps=100000 \
  --set checkpoint.every=0 > "$W/term.log" 2>&1 &
MPIPID=$!
sleep 3
pkill -TERM -f "^$BIN pretrain --config $CFG --set output.dir=$OUT " || fail "no rank to signal"
wait $MPIPID; rc=$?
[ "$rc" -eq 75 ] || { cat "$W/term.log"; fail "SIGTERM: exit code $rc, expected 75"; }
grep -q "Rerun the same command with --resume auto" "$W/term.log" || fail "SIGTERM: no resume hint"
"$BIN" ckpt verify "$OUT/checkpoints" || fail "SIGTERM: checkpoint does not verify"
step=$("$BIN" ckpt inspect "$OUT/checkpoints" | sed -n 's/.*phase pretrain, step \([0-9]*\).*/\1/p')
[ -n "$step" ] || fail "SIGTERM: no step in the checkpoint"
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" --set pretrain.steps=$((step + 4)) \
  --resume auto > "$W/term2.log" 2>&1 || { cat "$W/term2.log"; fail "SIGTERM: resume failed"; }
grep -q "resumed from .* at step $step" "$W/term2.log" || { cat "$W/term2.log"; fail "SIGTERM: did not resume at step $step"; }
echo "ok: SIGTERM at step $step saved a checkpoint, exit 75, resume finished"

# 2. SIGKILL of one rank during checkpoint writes
OUT="$W/kill"
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" --set pretrain.steps=100000 \
  --set checkpoint.every=1 --set checkpoint.keep=3 > "$W/kill.log" 2>&1 &
MPIPID=$!
wait_for_ckpts "$OUT/checkpoints" 3 60 || { cat "$W/kill.log"; fail "SIGKILL: no checkpoints appeared"; }
pid=$(pgrep -n -f "^$BIN pretrain --config $CFG --set output.dir=$OUT ")
kill -9 "$pid"
wait $MPIPID; rc=$?
[ "$rc" -ne 0 ] || fail "SIGKILL: the job exited 0"
"$BIN" ckpt verify "$OUT/checkpoints" || fail "SIGKILL: latest checkpoint does not verify"
step=$("$BIN" ckpt inspect "$OUT/checkpoints" | sed -n 's/.*phase pretrain, step \([0-9]*\).*/\1/p')
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" --set pretrain.steps=$((step + 3)) \
  --set checkpoint.every=0 --resume auto > "$W/kill2.log" 2>&1 || { cat "$W/kill2.log"; fail "SIGKILL: resume failed"; }
grep -q "resumed from .* at step $step" "$W/kill2.log" || { cat "$W/kill2.log"; fail "SIGKILL: did not resume"; }
echo "ok: SIGKILL of a rank while saving left checkpoint step $step intact; resume finished"
echo "2 passed, 0 failed"
