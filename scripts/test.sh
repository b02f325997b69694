#!/usr/bin/env bash
# Installs everything, then runs the whole test suite. The tests start what they need themselves:
# nats-server on free ports, and the local model server for the tests that drive it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/pytest "$@"
