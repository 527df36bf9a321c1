#!/usr/bin/env bash
# mpirun with sensible defaults for moeprune:
#   launch/mpirun.sh -np 4 build/moeprune forward --config configs/vmoe-tiny.yaml
# Adds --allow-run-as-root only when running as root, --oversubscribe when there are
# more ranks than cores, and OMP_NUM_THREADS = cores / ranks (at least 1) unless set.
# Exit code: mpirun's (0 done, 2 bad input, 3 diverged, 75 preempted and saved).
set -euo pipefail
np=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    -np|-n|--np) np="${args[i+1]}" ;;
  esac
done
cores=$(nproc)
flags=()
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
if [ "$np" -gt "$cores" ]; then
  flags+=(--oversubscribe --bind-to none)
else
  flags+=(--bind-to none)   # torch threads need the whole share, not one core
fi
threads="${OMP_NUM_THREADS:-$(( cores / np > 0 ? cores / np : 1 ))}"
# SIGTERM, SIGINT or SIGHUP (Ctrl-C, timeout, a scheduler signalling the launcher, a
# closed terminal) becomes SIGUSR1 to mpirun, which forwards it to every rank: they
# save a checkpoint and exit 75, and so does this script (mpirun itself would exit 1
# on a SIGTERM). From a terminal, mpirun runs in its own session so that a Ctrl-C
# reaches only this script (mpirun would kill the ranks before they save).
session=()
[ -t 0 ] && command -v setsid >/dev/null && session=(setsid)
"${session[@]}" mpirun "${flags[@]}" -x OMP_NUM_THREADS="$threads" "$@" &
pid=$!
forward() {
  echo "[mpirun.sh] $1: asking the ranks to checkpoint and stop (exit 75)" >&2
  kill -USR1 "$pid" 2>/dev/null || true
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
trap 'forward SIGHUP' HUP
rc=0
while :; do
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break   # wait returns early when a trapped signal arrives
done
exit "$rc"
