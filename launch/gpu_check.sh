#!/usr/bin/env bash
# The GPU checks of docs/performance.md, run by `launch/gpu_kit.sh check` on a GPU
# machine (environment from `gpu_kit.sh env`). Every step has a time limit, and a
# step that would start after GPUKIT_BUDGET_S seconds (default 420) is skipped, so
# that the whole check fits a short device lease. Writes at most 8 files into OUT:
#   summary.txt    one line per step: name, exit code, seconds
#   check.log      everything the steps print (benchmark tables and JSON rows)
#   step_b16_bf16.json.gz  a profiler trace of 3 training steps of V-MoE B/16 in bf16
#   unit.log       the CPU unit suite with the GPU visible
#   train_{cpu,gpu,gpu_bf16}.jsonl  the same short training run on CPU and GPU
#   demo.log       the demo job (tiny model, shortened) on the GPU
# Usage: launch/gpu_check.sh BUILD_DIR OUT_DIR [STEP ...]   (default: every step)
set -uo pipefail
# Steps that are more than one command run as `gpu_check.sh --inner NAME ...` (so that
# `timeout` can stop them), with M, DATA, SCRATCH and OUTD in the environment.
if [ "${1:-}" = "--inner" ]; then
  tiny=(--set "data.root=$DATA")
  case "$2" in
    train)  # train NAME [VAR=VALUE] [moeprune args]: a short run of the tiny model; data order
            # and router noise (CPU generators) are the same on every device
      name="$3"; shift 3
      envs=()
      if [ $# -gt 0 ] && [[ "$1" == *=* && "$1" != --* ]]; then envs+=("$1"); shift; fi
      env "${envs[@]}" "$M" pretrain "${tiny[@]}" --set "output.dir=$SCRATCH/$name" --set pretrain.steps=60 --set pretrain.warmup_steps=10 \
        --set pretrain.log_every=10 --set pretrain.eval_every=60 "$@"
      rc=$?
      cp "$SCRATCH/$name/metrics.jsonl" "$OUTD/train_$name.jsonl" 2>/dev/null
      python3 -c 'import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if "loss" in r: print(r.get("phase"), r.get("step"), "loss %.6e grad_norm %.6e" % (r["loss"], r.get("grad_norm", 0)))
    else: print(json.dumps(r)[:300])' "$SCRATCH/$name/metrics.jsonl"
      exit $rc ;;
    demo)  # the demo job, shortened: correctness on the GPU, not speed
      "$M" run "${tiny[@]}" --set "output.dir=$SCRATCH/demo" --set pretrain.steps=600 --set pretrain.eval_every=600 \
        --set finetune.steps=300 --set finetune.eval_every=300 --set refinetune.steps=100 --set checkpoint.every=200 \
        >"$OUTD/demo.log" 2>&1
      rc=$?
      tail -30 "$OUTD/demo.log"
      "$M" ckpt verify "$SCRATCH/demo/checkpoints" 2>&1 | tail -3
      exit $rc ;;
  esac
  echo "gpu_check.sh: unknown inner step $2" >&2
  exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$1"
OUTD="$2"
shift 2
BUDGET="${GPUKIT_BUDGET_S:-420}"
M="$BUILD/moeprune"
B="$BUILD/bench/moeprune-bench"
T="$BUILD/tests/moeprune_tests"
DATA="$ROOT/.gpukit/data"
[ -f "$DATA/train-images-idx3-ubyte.gz" ] || DATA=/usr/share/datasets/fashion-mnist
SCRATCH="$(mktemp -d /tmp/moeprune-gpucheck.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
LOG="$OUTD/check.log"
SUM="$OUTD/summary.txt"
: >"$LOG"
: >"$SUM"
T0=$(date +%s)
WANT=("$@")

wanted() {
  [ ${#WANT[@]} -eq 0 ] && return 0
  local w
  for w in "${WANT[@]}"; do [ "$w" = "$1" ] && return 0; done
  return 1
}

# step NAME LIMIT_S COMMAND...: runs COMMAND with a limit, appending its output to check.log.
step() {
  local name="$1" limit="$2"
  shift 2
  wanted "$name" || return 0
  local now=$(( $(date +%s) - T0 ))
  if [ "$now" -ge "$BUDGET" ]; then
    echo "$name skipped (budget ${BUDGET}s spent)" | tee -a "$SUM"
    return 0
  fi
  echo "===== $name ($(date +%T), t=${now}s): $*" >>"$LOG"
  local s=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a "$SUM" >>"$LOG"
}

step info 60 bash -c "nvidia-smi | head -12; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  python3 -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'; \
  nproc; ldd '$M' | grep -E 'not found|nccl|cudart|libtorch_cuda|libmpi.so'"
step gpu_tests 120 "$T" --gtest_filter='Gpu.*'
# The multi-rank test binary on one rank with the GPU visible: the mesh's NCCL
# sub-communicators (split even for one group), started all-reduces on the side
# stream, the gradient buckets on the device.
step mpi_np1 150 bash -c "mpirun -np 1 '$BUILD/tests/moeprune_mpi_tests' 2>&1 | grep -E 'FAILED|PASSED|Failure' | tail -20; exit \${PIPESTATUS[0]}"
step mpi_np1_gpu 60 bash -c "mpirun -np 1 -x MOEPRUNE_TEST_GPUS=1 '$BUILD/tests/moeprune_mpi_tests' --gtest_filter='Mesh.*:GradBuckets.*' 2>&1 | grep -E 'OK \]|FAILED|PASSED|Failure|cuda' | tail -20; exit \${PIPESTATUS[0]}"
step forward_cpu 90 env CUDA_VISIBLE_DEVICES= "$M" forward
step forward_gpu 90 "$M" forward
step kernels 120 "$B" kernels --repeat 20
step moe 150 "$B" moe --precision bf16 --repeat 5
# The peers (bench/peers: torchtitan, DeepSpeed, an einsum layer) against moeprune's layer,
# alternated, bf16; their wheels travel in .peers/wheels (bench/peers/setup.sh wheels);
# GPUKIT_PEERS picks some of them.
if [ -d "$ROOT/.peers/wheels" ]; then
  step peers 300 bash -c "python3 -m pip install -q --no-index --no-deps --no-compile --target '$SCRATCH/site' '$ROOT'/.peers/wheels/*.whl \
    && PYTHONPATH='$SCRATCH/site' python3 '$ROOT/bench/peers/run.py' --bench '$B' --device cuda --precision bf16 --rounds 1 \
       --repeat 10 --busy-max 99 --impls ${GPUKIT_PEERS:-titan_grouped,titan_shipped,titan_loop,deepspeed,einsum} \
       --shapes 16384x768x8,16384x768x32,4096x768x8,4096x768x32"
fi
step moe_loop 150 env MOEPRUNE_EXPERT_GEMM=loop "$B" moe --precision bf16 --repeat 5
step dispatch 90 "$B" dispatch --repeat 10
step step_s32_bf16 120 "$B" step --config "$ROOT/configs/vmoe-s32.yaml" --precision bf16 --repeat 10
step step_s32_fp32 120 "$B" step --config "$ROOT/configs/vmoe-s32.yaml" --precision fp32 --repeat 10
step step_b16_bf16 120 "$B" step --config "$ROOT/configs/vmoe-b16.yaml" --precision bf16 --repeat 10 \
  --profile "$SCRATCH/step_b16_bf16.json"
[ -s "$SCRATCH/step_b16_bf16.json" ] && gzip -c "$SCRATCH/step_b16_bf16.json" >"$OUTD/step_b16_bf16.json.gz"
step step_b16_bf16_256 120 "$B" step --config "$ROOT/configs/vmoe-b16.yaml" --precision bf16 --repeat 10 \
  --per-rank-batch 256
step step_b16_fp32 120 "$B" step --config "$ROOT/configs/vmoe-b16.yaml" --precision fp32 --repeat 10
export M DATA SCRATCH OUTD
step train_cpu 120 "$0" --inner train cpu CUDA_VISIBLE_DEVICES=
step train_gpu 120 "$0" --inner train gpu
step train_gpu_bf16 120 "$0" --inner train gpu_bf16 --set pretrain.precision=bf16
# Two ranks on one GPU must be refused with exit code 2 (NCCL cannot share a device).
step two_ranks_one_gpu_refused 60 bash -c "mpirun -np 2 '$M' forward; test \$? -eq 2"
step demo 200 "$0" --inner demo
# The unit suite reads the vmoe fixtures from ../shared and Fashion-MNIST from the
# configs' default path: on a bare GPU machine both come from the kit.
[ -e "$ROOT/../shared" ] || [ ! -d "$ROOT/.gpukit/shared" ] || ln -s "$ROOT/.gpukit/shared" "$ROOT/../shared"
if [ ! -e /usr/share/datasets/fashion-mnist ] && [ -d "$ROOT/.gpukit/data" ]; then
  mkdir -p /usr/share/datasets && ln -s "$ROOT/.gpukit/data" /usr/share/datasets/fashion-mnist
fi
export MOEPRUNE_TEST_BIN="$M" MOEPRUNE_TEST_ABORT_PROBE="$BUILD/tests/abort_probe" MOEPRUNE_TEST_MPIEXEC="$(command -v mpirun)"
step unit 150 bash -c "'$T' --gtest_filter='-Gpu.*' > '$OUTD/unit.log' 2>&1; rc=\$?; tail -5 '$OUTD/unit.log'; exit \$rc"
step sanitize 90 compute-sanitizer --tool memcheck "$T" --gtest_filter='Gpu.*'
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$SUM"
