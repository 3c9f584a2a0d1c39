#!/usr/bin/env bash
# Create the llm-compressor benchmark-peer virtualenv (default: <repo>/.venv-llmc).
# Idempotent: does nothing if the venv already imports llmcompressor.
# torch is installed FIRST as the local CPU wheel and then pinned with a
# constraint, so resolving llmcompressor never pulls a (huge) CUDA torch build.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLMC_VENV:-$REPO_ROOT/.venv-llmc}"
TORCH_VERSION="2.13.0"
LLMC_VERSION="0.14.0.1"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import llmcompressor' >/dev/null 2>&1; then
    echo "llmcompressor venv already set up at $VENV" >&2
    exit 0
fi

python3 -m venv "$VENV"
"$VENV/bin/pip" install "torch==$TORCH_VERSION"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
# llmcompressor 0.14.0.1 pins transformers<=5.17.0,>=5.15.0, compressed-tensors==0.19.0,
# torch>=2.10.0,<=2.14.0; pip resolves the rest.
"$VENV/bin/pip" install -c "$CONSTRAINTS" "llmcompressor==$LLMC_VERSION"

"$VENV/bin/python" - <<'PY'
import torch, transformers, compressed_tensors, llmcompressor
print("torch", torch.__version__, "| transformers", transformers.__version__,
      "| compressed-tensors", compressed_tensors.__version__,
      "| llmcompressor", llmcompressor.__version__)
assert torch.__version__.startswith("2.13.0"), torch.__version__
PY
