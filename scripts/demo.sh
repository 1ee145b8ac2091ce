#!/usr/bin/env bash
# The demo: set up, build the test models (and the trained circles demo model), run the shipped circles workflow
# headless through a real ComfyUI (a circle-outline hint in, a filled circle out where the outline is, plus the
# control report), and write its images to output/.
#   bash scripts/demo.sh [WORKFLOW_API_JSON]
# To use your own ComfyUI and models: CONTROLSTACK_COMFY_DIR=... CONTROLSTACK_BASE_DIR=... bash scripts/demo.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WORKFLOW="${1:-workflows/api/controlstack_circles.json}"

bash scripts/setup.sh
if [ -z "${CONTROLSTACK_BASE_DIR:-}" ]; then
  echo "[demo] building the test models and the circles demo model (first time ~1 min)"
  .venv/bin/python scripts/host.py -q models >/dev/null
fi
echo "[demo] running $WORKFLOW (a ComfyUI server starts and stops; ~1 min on a CPU)"
.venv/bin/python scripts/host.py -q run "$WORKFLOW" --out "$REPO/output"
