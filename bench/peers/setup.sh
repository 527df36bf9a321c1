#!/usr/bin/env bash
# Installs the peer MoE implementations that bench/peers/peer_moe.py times against
# moeprune, into .peers/ (git-ignored), beside, not inside, the project's .venv:
#   torchtitan 0.3.0 and DeepSpeed 0.19.8 from PyPI, with only the packages their MoE
#   code imports (pinned; pip's resolver is off so that the .venv's torch is not touched).
# Tutel is not on PyPI (GitHub only) and is therefore not installed.
#
#   bench/peers/setup.sh            # here (network to PyPI)
#   bench/peers/setup.sh wheels     # also: x86-64 CPython 3.12 wheels into .peers/wheels
#                                   # for a machine without network (the lent GPU machines)
# Then: PYTHONPATH=.peers/site .venv/bin/python bench/peers/run.py ...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PEERS_PYTHON:-$ROOT/.venv/bin/python}"
DEST="$ROOT/.peers"
[ -x "$PY" ] || { echo "peers/setup.sh: $PY missing: run launch/setup.sh first (the project's .venv)" >&2; exit 2; }
PKGS=(torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0
      einops==0.8.1 hjson==3.1.0 msgpack==1.1.2 psutil==7.1.3 py-cpuinfo==9.0.0 tqdm==4.67.1 ninja==1.13.0
      pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
      typing-extensions==4.15.0)
DS=deepspeed==0.19.8   # an sdist: built here into a pure-Python wheel without its C++ ops
mkdir -p "$DEST/build" "$DEST/wheels"
if ! ls "$DEST"/build/deepspeed-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --target "$DEST/build/tools" wheel
  (cd "$DEST/build" && "$PY" -m pip download -q --no-deps --no-binary :all: "$DS" -d .)
  PYTHONPATH="$DEST/build/tools" DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation \
    "$DEST"/build/deepspeed-*.tar.gz -w "$DEST/build"
fi
"$PY" -m pip install -q --no-deps --upgrade --target "$DEST/site" "${PKGS[@]}" "$DEST"/build/deepspeed-*.whl
if [ "${1:-}" = wheels ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST/wheels" "${PKGS[@]}"
  cp "$DEST"/build/deepspeed-*.whl "$DEST/wheels/"
  du -sh "$DEST/wheels"
fi
PYTHONPATH="$DEST/site" "$PY" -c 'import deepspeed.moe.layer, torchtitan.models.common.moe; print("[peers] torchtitan and DeepSpeed import")' 2>&1 | tail -1
