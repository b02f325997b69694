#!/usr/bin/env bash
# Installs everything, then runs one full improvement cycle on the embedded local model.
# Extra arguments go to `ratchet demo` (e.g. --yes to let the policy approver decide).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/ratchet demo --fresh --report .ratchet-demo-report.json "$@"
