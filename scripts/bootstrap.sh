#!/usr/bin/env bash
# Create .venv and install kexaone-align into it (editable). `scripts/bootstrap.sh dev` adds test tools.
# On machines without an NVIDIA GPU the CPU build of torch is installed first, so pip never pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
.venv/bin/python -m pip install -q -e ".${extra}"
