#!/usr/bin/env bash
# Weak scaling of a training step: `moeprune-bench step` (tiny default, fixed
# images per rank) on several process meshes, then a table of images/s, efficiency
# (per-rank throughput relative to 1 rank) and the gradient reduction time left
# after backward, for both ways of reducing dense gradients. One thread per rank
# so that ranks, not threads, share the cores; with more ranks than cores the run
# is oversubscribed and the table says so.
#   launch/bench_scaling.sh [--meshes "1:1 2:2 2:1 4:4 4:2 4:1"] [--grad-reduce "overlap flat"]
#                           [--per-rank-batch B] [--repeat N] [--set a.b=c ...]
# A mesh is RANKS:N (N ranks per expert-parallel group, RANKS/N groups).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="${MOEPRUNE_BUILD_DIR:-$ROOT/build}/bench/moeprune-bench"
[ -x "$BENCH" ] || { echo "bench_scaling: $BENCH not found; run launch/build.sh first" >&2; exit 2; }
meshes="1:1 2:2 2:1 4:4 4:2 4:1"
modes="overlap flat"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --meshes) meshes="$2"; shift 2 ;;
    --ranks) meshes=""; for r in $2; do meshes="$meshes $r:0"; done; shift 2 ;;
    --grad-reduce) modes="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for m in $meshes; do
  np=${m%%:*}; ep=${m##*:}
  for mode in $modes; do
    [ "$np" -eq 1 ] && [ "$mode" != "${modes%% *}" ] && continue  # one rank reduces nothing
    echo "[bench_scaling] $np rank(s), expert_parallel $ep, grad_reduce $mode" >&2
    OMP_NUM_THREADS=1 "$ROOT/launch/mpirun.sh" -np "$np" -x OMP_NUM_THREADS=1 "$BENCH" step \
      --set parallel.expert_parallel="$ep" --set parallel.grad_reduce="$mode" "${extra[@]}" | grep '^{' >> "$out"
  done
done
python3 - "$out" "$(nproc)" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cores = int(sys.argv[2])
base = next((r for r in rows if r["ranks"] == 1), rows[0])
base_per_rank = base["images_per_s"] / base["ranks"]
print(f"weak scaling, {base['model']}, {base['per_rank_batch']} images per rank, 1 thread per rank, {cores} cores, device {base['device']}")
print(f"  {'ranks':>5} {'D x N':>6} {'reduce':>8} {'ms/step':>9} {'images/s':>10} {'per rank':>9} {'efficiency':>10} {'sync ms':>8}  note")
for r in rows:
    per = r["images_per_s"] / r["ranks"]
    note = f"oversubscribed ({r['ranks']} ranks on {cores} cores)" if r["ranks"] > cores else ""
    mesh = f"{r.get('groups', 1)}x{r.get('expert_parallel', r['ranks'])}"
    print(f"  {r['ranks']:>5} {mesh:>6} {r.get('grad_reduce', '-'):>8} {1e3 * r['step_s']:>9.1f} {r['images_per_s']:>10.1f} "
          f"{per:>9.1f} {per / base_per_rank:>9.0%} {r.get('grad_sync_ms', 0):>8.2f}  {note}")
print(json.dumps({"bench": "weak_scaling", "results": rows}))
PY
