#!/usr/bin/env bash
# The test command: set up, build the random test models, run every level (unit, host, browser).
#   bash scripts/test.sh [PYTEST_ARGS...]      e.g.  bash scripts/test.sh -m unit
# JUnit XML and failure artifacts (server logs, screenshots) go to .artifacts/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

bash scripts/setup.sh
t0=$SECONDS
.venv/bin/python scripts/host.py -q models >/dev/null
echo "[test] models ready ($((SECONDS - t0)) s)"
mkdir -p .artifacts
# --durations: the slowest tests in every log, so CI time can be traced to tests (the 30-minute target).
exec .venv/bin/python -m pytest tests -p no:cacheprovider --durations=30 --junitxml=.artifacts/junit.xml "$@"
