#!/usr/bin/env bash
# mpirun with sensible defaults for moeprune:
#   launch/mpirun.sh -np 4 build/moeprune forward --config configs/vmoe-tiny.yaml
# Adds --allow-run-as-root only when running as root, --oversubscribe when there are
# more ranks than cores, and OMP_NUM_THREADS = cores / ranks (at least 1) unless set.
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
exec mpirun "${flags[@]}" -x OMP_NUM_THREADS="$threads" "$@"
