#!/usr/bin/env bash
# A real Slurm requeue of launch/slurm.sbatch (registered in ctest as slurm_requeue).
# Set-up: a one-node Slurm cluster of this machine, started for the test and stopped
# after it: slurmctld, slurmd and munge from Debian (installed when missing, as
# root), a private slurm.conf for a container without cgroups (proctrack/pgid,
# task/none, own ports, state in the scratch directory).
#  1. The template, 2 tasks, on the small planted config (pretrain -> finetune ->
#     prune -> re-fine-tune): SIGUSR1 to the tasks during pretraining (what the
#     template's `--signal=USR1@300` sends before the time limit): every rank saves and
#     exits 75, the batch script requeues the job, the requeued job resumes with
#     --resume auto and finishes.
#  2. The same config run uninterrupted (mpirun): the same pruning report (test
#     accuracies before and after pruning, after re-fine-tuning, the plan).
# Without root (no daemons can be started) the test says why and is skipped.
# usage: slurm_requeue.sh BUILD/moeprune SOURCE_DIR
set -u
source "$(dirname "$0")/cli_common.sh" slurm "$1" "$2"
skip() { echo "SKIPPED: $*"; exit 0; }
[ "$(id -u)" -eq 0 ] || skip "a Slurm cluster needs root to start slurmctld/slurmd (not root here)"
if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v munged > /dev/null || \
   ! command -v sbatch > /dev/null; then
  echo "installing slurmctld slurmd slurm-client munge (Debian)"
  install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
      >> "$W/apt.log" 2>&1
  }
  install || { apt-get update -qq >> "$W/apt.log" 2>&1; install; } \
    || skip "Slurm could not be installed from Debian here: $(tail -1 "$W/apt.log")"
fi

stop_cluster() {  # the daemons of this test only (their command lines name $W)
  pkill -f -- "$W/slurm.conf" 2>/dev/null
  pkill -f -- "$W/munge/munge.socket" 2>/dev/null
  sleep 1
  rm -rf "$W"
}
trap stop_cluster EXIT

# Munge (Slurm's authentication): the key the package made, one daemon for the test.
[ -f /etc/munge/munge.key ] || skip "no /etc/munge/munge.key (the munge package made none)"
mkdir -p "$W/munge"; chown munge:munge "$W/munge" 2>/dev/null
MUNGE_SOCKET="$W/munge/munge.socket"
# (Daemons never hold the test's stdout/stderr: ctest would wait for them.)
munged --force --socket="$MUNGE_SOCKET" --pid-file="$W/munge/munged.pid" --log-file="$W/munge/munged.log" \
  < /dev/null > /dev/null 2>&1 \
  || skip "munged cannot start here"
export MUNGE_SOCKET

HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$W/state" "$W/spool" "$W/log"
cat > "$W/slurm.conf" <<CONF
ClusterName=moeprune-test
SlurmctldHost=$HOST
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
ReturnToService=2
JobRequeue=1
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=test Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF="$W/slurm.conf"
# A machine where the daemons cannot run (no root privileges in a sandbox, ports taken)
# skips with the daemons' own words; everything after this is the template's test.
slurmctld -f "$W/slurm.conf" < /dev/null > "$W/log/slurmctld.out" 2>&1 || skip "slurmctld cannot start here"
slurmd -f "$W/slurm.conf" < /dev/null > "$W/log/slurmd.out" 2>&1 || skip "slurmd cannot start here"
for _ in $(seq 1 60); do sinfo -h -o %t 2>/dev/null | grep -q idle && break; sleep 0.5; done
sinfo -h -o %t 2>/dev/null | grep -q idle \
  || skip "the Slurm node did not come up here: $(tail -2 "$W/log/slurmd.log" "$W/log/slurmctld.log" 2>/dev/null | tr '\n' ' ')"
echo "ok: a one-node Slurm cluster runs ($(sinfo -h -o '%P %D %c %t'))"

# The job's working directory: the template runs build/moeprune from the submit directory.
mkdir -p "$W/submit"
ln -s "$(cd "$(dirname "$BIN")" && pwd)" "$W/submit/build"
cat > "$W/job.yaml" <<YAML
base: $CFG
pretrain: {steps: 200}
checkpoint: {every: 10}
output: {dir: $W/slurm-run}
YAML
jid=$(cd "$W/submit" && sbatch --parsable --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 \
  --time=15:00 --output="$W/job.out" \
  --export=ALL,CONFIG="$W/job.yaml" "$SRC/launch/slurm.sbatch") \
  || fail "sbatch failed"
state() { scontrol show job "$jid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
for _ in $(seq 1 600); do ls -d "$W/slurm-run/checkpoints/ckpt-"* > /dev/null 2>&1 && break; sleep 0.2; done
ls -d "$W/slurm-run/checkpoints/ckpt-"* > /dev/null 2>&1 || { cat "$W/job.out"; fail "the job saved no checkpoint"; }
scancel --signal=USR1 "$jid" || fail "scancel --signal=USR1"
for _ in $(seq 1 300); do [ "$(state)" = PENDING ] && break; sleep 0.2; done
[ "$(state)" = PENDING ] || { cat "$W/job.out"; fail "the job was not requeued (state $(state))"; }
grep -q "moeprune exited with 75" "$W/job.out" && grep -q "requeueing" "$W/job.out" \
  || { cat "$W/job.out"; fail "no exit 75 and requeue in the job output"; }
echo "ok: SIGUSR1 to the tasks: every rank saved, exit 75, the job requeued itself"
scontrol update jobid="$jid" starttime=now   # Slurm delays a requeued job's start; not what is tested
for _ in $(seq 1 1800); do
  s=$(state); [ "$s" = COMPLETED ] || [ "$s" = FAILED ] || [ "$s" = CANCELLED ] && break; sleep 0.2
done
[ "$(state)" = COMPLETED ] || { cat "$W/job.out"; fail "the requeued job did not complete (state $(state))"; }
grep -q "resumed from .*pretrain-step" "$W/job.out" || { cat "$W/job.out"; fail "the requeued job did not resume"; }
grep -q "restart count 1" "$W/job.out" || { cat "$W/job.out"; fail "no second run of the batch script"; }
echo "ok: the requeued job resumed from the checkpoint and completed"

"${MPI[@]}" -np 2 "$BIN" run --config "$W/job.yaml" --set output.dir="$W/plain" > "$W/plain.log" 2>&1 \
  || { cat "$W/plain.log"; fail "the uninterrupted run"; }
python3 - "$W/slurm-run" "$W/plain" <<'PY' || fail "the requeued run's report differs from the uninterrupted run's"
import json, sys
ra, rb = (json.load(open(d + "/prune_report.json")) for d in sys.argv[1:3])
for k in ra:
    if k in ("checkpoint_in", "checkpoint_out"):
        continue
    assert ra[k] == rb[k], (k, ra[k], rb[k])
print("ok: same report as the uninterrupted run: test accuracy", ra["test_accuracy_before"], "->",
      ra["test_accuracy_after"], "after pruning")
PY
echo "slurm_requeue: all passed"
