#!/usr/bin/env bash
# The prepared GPU run of the speed issue, round two: one call on a device machine (H100 / H200), the host's own
# step and the built-in ControlNet measured in the same process as ControlStack's rows.
#
#   here (with network):  bash bench/gpu_round_two.sh prepare    # wheels the GPU image lacks -> .gpu_wheels/
#   on the device:        bash bench/gpu_round_two.sh            # carry: .host/comfyui and .gpu_wheels
#
# It runs (1) bench/check_cuda_graphs.py, the real-capture check that replay equals eager across runs, edits,
# moved weights and the report (exit 1 on a failed check), then (2) bench/bench_controlnet.py (SD1.5 512^2 N = 1..3,
# SDXL 1024^2 N = 1..2: host, built-in, eager, graphs, graphs + report), then (3) SD1.5 again with
# CONTROLSTACK_COMPILE=1 (the compiled path; its first run includes the compile). Logs and JSON go to $OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ComfyUI's own requirements that the device image (PyTorch, transformers, safetensors, ...) does not hold.
GPU_WHEELS=(torchsde trampoline)

if [[ "${1:-}" == "prepare" ]]; then
  mkdir -p .gpu_wheels
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu_wheels "${GPU_WHEELS[@]}"
  ls -la .gpu_wheels
  exit 0
fi

PY=${PY:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if compgen -G ".gpu_wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps .gpu_wheels/*.whl
fi
# controlstack is this folder: make it importable by that name without installing it
mkdir -p /tmp/cs_pkgs && ln -sfn "$PWD" /tmp/cs_pkgs/controlstack
export PYTHONPATH="/tmp/cs_pkgs${PYTHONPATH:+:$PYTHONPATH}"
stamp="$(date +%Y-%m-%d)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_${stamp}.txt"

"$PY" bench/check_cuda_graphs.py 2>&1 | tee "$OUT/check_cuda_graphs_${stamp}.log"
"$PY" bench/bench_controlnet.py --comfy-dir .host/comfyui --json "$OUT/round_two_${stamp}.json" 2>&1 \
  | tee "$OUT/round_two_${stamp}.log"
CONTROLSTACK_COMPILE=1 "$PY" bench/bench_controlnet.py --comfy-dir .host/comfyui --skip-sdxl \
  --json "$OUT/round_two_compiled_${stamp}.json" 2>&1 | tee "$OUT/round_two_compiled_${stamp}.log"
