#!/usr/bin/env bash
# Install aligner into a GPU base image (NGC PyTorch, or NVIDIA's TensorRT-LLM release image)
# without replacing the image's own CUDA stack. Run by the Dockerfile from the source directory:
#   bash scripts/install_in_image.sh [--require-te] [EXTRAS]      e.g. --require-te "[test]"
# 1. writes a pip constraints file pinning the image's torch, TransformerEngine, apex and the
#    other builds compiled against that torch (the versions `pip list` reports, e.g. NGC's
#    torch==2.7.0a0+7c8ec84dab), and installs aligner under it (plus the image's own
#    PIP_CONSTRAINT, which a -c on the command line would otherwise replace);
# 2. fails if pip changed any of them anyway, or if torch is not a CUDA build;
# 3. with --require-te, fails unless transformer_engine.pytorch imports.
set -euo pipefail
REQUIRE_TE=0
if [ "${1:-}" = "--require-te" ]; then REQUIRE_TE=1; shift; fi
EXTRAS=${1:-}
PY=${PYTHON:-python}
CONSTRAINTS=${ALIGNER_CONSTRAINTS:-/etc/aligner/constraints.txt}
STACK='^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|transformer[-_]engine[-_a-z0-9]*|apex|flash[-_]attn|nvfuser|tensorrt[-_a-z0-9]*|nvidia[-_]modelopt[-_a-z0-9]*)=='

stack() { "$PY" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null | grep -iE "$STACK" | sort -f || true; }

mkdir -p "$(dirname "$CONSTRAINTS")"
stack > "$CONSTRAINTS"
grep -qi '^torch==' "$CONSTRAINTS" || { echo "error: the base image has no torch (pip list)" >&2; exit 1; }
echo "pinned from the base image ($CONSTRAINTS):"
cat "$CONSTRAINTS"

ARGS=(-c "$CONSTRAINTS")
for file in ${PIP_CONSTRAINT:-}; do ARGS+=(-c "$file"); done
"$PY" -m pip install --no-cache-dir "${ARGS[@]}" -e ".${EXTRAS}"

if ! diff -u "$CONSTRAINTS" <(stack); then
  echo "error: installing aligner changed the image's stack (diff above): a requirement excludes the image's versions" >&2
  exit 1
fi
"$PY" - <<'PY'
import torch

import aligner  # noqa: F401
import megatron.core

assert torch.version.cuda, f"torch {torch.__version__} in this image is not a CUDA build"
print(f"aligner ok: torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core {megatron.core.__version__}")
PY
if [ "$REQUIRE_TE" = 1 ]; then
  "$PY" -c "import transformer_engine.pytorch, transformer_engine; print('TransformerEngine', transformer_engine.__version__)"
fi
