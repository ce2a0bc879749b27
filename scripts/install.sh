#!/usr/bin/env bash
# Sets up a fresh machine for armnet_ops: a compatible torch when none is installed, the small
# dependencies, then the package itself with its C++ (and, when a GPU is visible or FORCE_CUDA=1,
# CUDA) extension built in place. Safe to run again: what is there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] no torch found: installing torch==2.14.1"
  "$PY" -m pip install -q "torch==2.14.1"
fi
"$PY" -m pip install -q ninja pybind11 packaging numpy pillow tqdm pytest hypothesis
if ! "$PY" -c "import triton" 2>/dev/null; then
  # Optional on a CPU (its kernels are tested there under TRITON_INTERPRET=1); never fatal.
  "$PY" -m pip install -q triton || echo "[install] triton not installed: the Triton backend is off"
fi
"$PY" -m pip install -q onnx onnxscript onnxruntime || echo "[install] onnx/onnxscript/onnxruntime not installed: the ONNX export tests are skipped"
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -m armnet_ops.info | sed -n 1,5p  # sed reads to the end: no broken pipe
