# Shared set-up of the command-line tests, sourced as
#   source "$(dirname "$0")/cli_common.sh" NAME BUILD/moeprune SOURCE_DIR
# Sets BIN, SRC, MPI (mpirun with one thread per rank, oversubscription allowed,
# --allow-run-as-root as root), CFG (the small planted-task config), W (a scratch
# directory removed at exit) and fail().
NAME="$1"; BIN="$2"; SRC="$3"
MPI=(mpirun --oversubscribe --bind-to none -x OMP_NUM_THREADS=1)
[ "$(id -u)" -eq 0 ] && MPI+=(--allow-run-as-root)
CFG="$SRC/tests/data/small-planted.yaml"
W=$(mktemp -d "/tmp/moeprune-$NAME.XXXXXX")
trap 'rm -rf "$W"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
