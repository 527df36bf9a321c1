#!/usr/bin/env bash
# Installs everything moeprune needs on a fresh Debian machine, idempotently:
# Debian packages (Open MPI, spdlog, yaml-cpp, CLI11, nlohmann-json, GoogleTest,
# Fashion-MNIST, build tools) and LibTorch 2.11.0 from the torch==2.11.0 wheel in
# the git-ignored .venv. Skips what is already there and says what it does.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION=2.11.0
say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

DEB_PACKAGES=(build-essential cmake ninja-build pkg-config openmpi-bin libopenmpi-dev libspdlog-dev libfmt-dev
              libyaml-cpp-dev libcli11-dev zlib1g-dev nlohmann-json3-dev libgtest-dev libmsgpack-cxx-dev
              dataset-fashion-mnist)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
    SUDO=sudo
  fi
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq || die "apt-get update failed (is a Debian mirror reachable?)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get could not install: ${missing[*]}"
else
  say "Debian packages present (${#DEB_PACKAGES[@]})"
fi

VENV="$ROOT/.venv"
have_torch() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_VERSION" <<'PY' 2>/dev/null
import sys, importlib.metadata as m
ok = m.version("torch").split("+")[0] == sys.argv[1]
m.version("matplotlib")  # raises when missing
sys.exit(0 if ok else 1)
PY
}
if have_torch; then
  say "torch $TORCH_VERSION present in .venv"
else
  command -v python3 >/dev/null || die "python3 is needed to create .venv"
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
  fi
  say "installing torch==$TORCH_VERSION (LibTorch for C++), numpy and matplotlib into .venv; the first time this downloads ~3 GB"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" numpy matplotlib \
    || die "pip could not install torch==$TORCH_VERSION (is PyPI reachable?)"
  have_torch || die "torch $TORCH_VERSION is not importable from .venv after installation"
fi
say "done"
