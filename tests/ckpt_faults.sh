#!/usr/bin/env bash
# Checkpoint fault tests through the command line (registered in ctest):
#  1. SIGTERM to the ranks mid-training: every rank saves, exit code 75; --resume auto finishes.
#  2. SIGKILL of one rank while checkpoints are being written every step: the latest
#     checkpoint verifies, and --resume auto finishes the phase.
#  3. SIGTERM to launch/mpirun.sh (not to the ranks): the ranks save, the script exits 75.
#  4. A second job on the same output.dir is refused while the first runs (exit 2).
#  5. An edited manifest: ckpt verify and resume refuse it (exit 2, one line).
#  6. File-system errors while saving: a checkpoint.dir below a regular file, a model
#     file path that is a directory, and (where tmpfs can be mounted: root) a full disk
#     in the middle of a run: exit 2 with the same line on every rank, no MPI abort, the
#     previous checkpoint intact and resumable once there is space.
# (prune --from a checkpoint fine-tuned on another task: prune_cli.sh.)
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

# 3. SIGTERM to the launcher script
OUT="$W/launcher"
OMP_NUM_THREADS=1 "$SRC/launch/mpirun.sh" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" \
  --set pretrain.steps=100000 --set checkpoint.every=0 > "$W/launcher.log" 2>&1 &
LPID=$!
trap 'kill -TERM "$LPID" 2>/dev/null; wait "$LPID" 2>/dev/null; umount "$W/small" 2>/dev/null; rm -rf "$W"' EXIT   # no job left behind
for _ in $(seq 1 100); do grep -q "pretrain: " "$W/launcher.log" 2>/dev/null && break; sleep 0.1; done
sleep 2

# 4. (while job 3 runs) a second job on the same output.dir
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" --set pretrain.steps=5 \
  > "$W/second.log" 2>&1; rc=$?
[ "$rc" -eq 2 ] || { cat "$W/second.log"; fail "second job on one output.dir: exit code $rc, expected 2"; }
[ "$(grep -c "is in use by another moeprune job (pid" "$W/second.log")" -eq 2 ] ||
  { cat "$W/second.log"; fail "second job: no one-line error on each rank"; }
echo "ok: a second job on the same output.dir is refused on every rank, exit 2"

kill -TERM "$LPID"
wait "$LPID"; rc=$?
[ "$rc" -eq 75 ] || { cat "$W/launcher.log"; fail "SIGTERM to launch/mpirun.sh: exit code $rc, expected 75"; }
"$BIN" ckpt verify "$OUT/checkpoints" > /dev/null || fail "SIGTERM to the launcher: checkpoint does not verify"
echo "ok: SIGTERM to launch/mpirun.sh: the ranks saved, exit 75"

# 5. An edited manifest (step 17 written over the saved step)
latest="$OUT/checkpoints/$(cat "$OUT/checkpoints/latest")"
sed -i 's/"step": [0-9]*/"step": 17/' "$latest/manifest.json"
"$BIN" ckpt verify "$OUT/checkpoints" > "$W/verify.log" 2>&1; rc=$?
[ "$rc" -eq 2 ] || { cat "$W/verify.log"; fail "verify of an edited manifest: exit code $rc, expected 2"; }
grep -q "the manifest was edited or is corrupt" "$W/verify.log" || { cat "$W/verify.log"; fail "verify: no message"; }
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$OUT" --set pretrain.steps=100000 \
  --resume auto > "$W/edited.log" 2>&1; rc=$?
[ "$rc" -eq 2 ] || { cat "$W/edited.log"; fail "resume of an edited manifest: exit code $rc, expected 2"; }
echo "ok: an edited manifest is refused by verify and by resume, exit 2"

# 6. File-system errors while saving.
fs_error() {  # log message
  rc=$2
  [ "$rc" -eq 2 ] || { cat "$1"; fail "$3: exit code $rc, expected 2"; }
  [ "$(grep -c "error: $4" "$1")" -eq 2 ] || { cat "$1"; fail "$3: not one line '$4' on each rank"; }
  grep -q "MPI_ABORT" "$1" && { cat "$1"; fail "$3: ended with an MPI abort"; }
  echo "ok: $3: exit 2, one line on every rank: $(grep -m1 'rank 0/2\] error' "$1" | sed 's/.*error: //')"
}
touch "$W/afile"
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$W/fs1" --set checkpoint.dir="$W/afile/ckpts" \
  --set checkpoint.every=4 > "$W/fs1.log" 2>&1
fs_error "$W/fs1.log" $? "checkpoint.dir below a file" "checkpoint: cannot create a checkpoint under '$W/afile/ckpts' (rank 0): .*Not a directory"
mkdir -p "$W/fs2/pretrained.safetensors"
"${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$W/fs2" > "$W/fs2.log" 2>&1
fs_error "$W/fs2.log" $? "model file path is a directory" "cannot write the model file '$W/fs2/pretrained.safetensors' (rank 0)"
mkdir -p "$W/small"
if mount -t tmpfs -o size=200k tmpfs "$W/small" 2>/dev/null; then
  "${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$W/fs3" --set checkpoint.dir="$W/small/ck" \
    --set checkpoint.every=1 --set checkpoint.async=true --set checkpoint.keep=100 > "$W/fs3.log" 2>&1
  fs_error "$W/fs3.log" $? "disk full during an asynchronous save" "checkpoint ckpt-.* failed (rank .): .*No space left on device; the previous checkpoint, if any, is intact"
  "$BIN" ckpt verify "$W/small/ck" > /dev/null || fail "disk full: the latest checkpoint does not verify"
  mount -o remount,size=20m "$W/small" || fail "remount"
  "${MPI[@]}" -np 2 "$BIN" pretrain --config "$CFG" --set output.dir="$W/fs3" --set checkpoint.dir="$W/small/ck" \
    --set checkpoint.every=4 --resume auto > "$W/fs3r.log" 2>&1 || { cat "$W/fs3r.log"; fail "resume after the disk was full"; }
  grep -q "resumed from .*step00000001" "$W/fs3r.log" || { cat "$W/fs3r.log"; fail "resume did not start from the intact checkpoint"; }
  umount "$W/small"
  echo "ok: disk full: the previous checkpoint verifies, and the run resumes from it once there is space"
else
  echo "note: tmpfs cannot be mounted here (not root): the full-disk case did not run"
fi
echo "6 passed, 0 failed"
