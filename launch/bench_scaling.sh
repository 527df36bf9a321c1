#!/usr/bin/env bash
# Weak scaling of a training step: `moeprune-bench step` (tiny default, fixed
# images per rank) on 1, 2 and 4 ranks, then a table of images/s and efficiency
# (per-rank throughput relative to 1 rank). One thread per rank so that ranks, not
# threads, share the cores; with more ranks than cores the run is oversubscribed
# and the table says so.
#   launch/bench_scaling.sh [--per-rank-batch B] [--repeat N] [--ranks "1 2 4"]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="${MOEPRUNE_BUILD_DIR:-$ROOT/build}/bench/moeprune-bench"
[ -x "$BENCH" ] || { echo "bench_scaling: $BENCH not found; run launch/build.sh first" >&2; exit 2; }
ranks="1 2 4"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --ranks) ranks="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for np in $ranks; do
  echo "[bench_scaling] $np rank(s)" >&2
  OMP_NUM_THREADS=1 "$ROOT/launch/mpirun.sh" -np "$np" -x OMP_NUM_THREADS=1 "$BENCH" step "${extra[@]}" |
    grep '^{' >> "$out"
done
python3 - "$out" "$(nproc)" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cores = int(sys.argv[2])
base = next((r for r in rows if r["ranks"] == 1), rows[0])
base_per_rank = base["images_per_s"] / base["ranks"]
print(f"weak scaling, {base['model']}, {base['per_rank_batch']} images per rank, 1 thread per rank, {cores} cores, device {base['device']}")
print(f"  {'ranks':>5} {'ms/step':>9} {'images/s':>10} {'per rank':>9} {'efficiency':>10}  note")
for r in rows:
    per = r["images_per_s"] / r["ranks"]
    note = f"oversubscribed ({r['ranks']} ranks on {cores} cores)" if r["ranks"] > cores else ""
    print(f"  {r['ranks']:>5} {1e3 * r['step_s']:>9.1f} {r['images_per_s']:>10.1f} {per:>9.1f} {per / base_per_rank:>9.0%}  {note}")
print(json.dumps({"bench": "weak_scaling", "results": rows}))
PY
