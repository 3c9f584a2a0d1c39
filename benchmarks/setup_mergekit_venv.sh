#!/usr/bin/env bash
# Create the mergekit benchmark-peer virtualenv (default: <repo>/.venv-mergekit).
# Idempotent: does nothing if the venv already imports mergekit.
# torch is installed FIRST and pinned with a constraint, so resolving mergekit never pulls
# another (CUDA) torch build.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERGEKIT_VENV:-$REPO_ROOT/.venv-mergekit}"
TORCH_VERSION="2.13.0"
MERGEKIT_VERSION="0.1.5"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import mergekit' >/dev/null 2>&1; then
    echo "mergekit venv already set up at $VENV" >&2
    exit 0
fi

python3 -m venv "$VENV"
"$VENV/bin/pip" install "torch==$TORCH_VERSION"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"
"$VENV/bin/pip" install -c "$CONSTRAINTS" "mergekit==$MERGEKIT_VERSION"
"$VENV/bin/python" -c 'import mergekit, torch, transformers; print("mergekit ok | torch", torch.__version__, "| transformers", transformers.__version__)'
