#!/usr/bin/env bash
# Create .venv in the repository and install arow with what it needs; install Fashion-MNIST if missing.
# Idempotent: a second run only checks. TORCH_SPEC picks the PyTorch build (default: the CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
stamp=.venv/.arow-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$EXTRAS" ]; then
  echo "[setup] installing arow${EXTRAS:+[$EXTRAS]}" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
  echo -n "$EXTRAS" > "$stamp"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ "${SKIP_DATA:-0}" != 1 ] && [ ! -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's dataset-fashion-mnist" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "[setup] Fashion-MNIST is not in $FMNIST. Install it with 'sudo apt-get install dataset-fashion-mnist'" >&2
    echo "        or download the four *-ubyte.gz files and pass --data-dir FOLDER to arow." >&2
  fi
fi
