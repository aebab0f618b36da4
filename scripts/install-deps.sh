#!/usr/bin/env bash
# Installs the Debian 12 packages cacheshrink needs to build, test and benchmark.
# Does nothing when they are all present; uses sudo when not run as root.
set -euo pipefail
pkgs=(build-essential cmake pkg-config git libeigen3-dev nlohmann-json3-dev libpcre2-dev doctest-dev libcli11-dev libbenchmark-dev
      openmpi-bin libopenmpi-dev)  # MPI: optional for the library; multi-process CLI and tests/mpi (docs/scaling.md)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
