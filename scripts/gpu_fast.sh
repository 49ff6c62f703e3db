#!/usr/bin/env bash
# The fast path on a GPU: benchmarks/step_cost.py --fast (latent DPO and NCP-DPO per error mode, compile x
# channels-last, interleaved) on the SD1.5 architecture at 64x64 latents (512 px), fp16 and bf16, with each
# method's MFU (FLOPs counted per step / time / the GPU's half-precision peak). Tables on stdout, JSON in OUT.
#   bash scripts/gpu_fast.sh                 # DTYPES="bf16" COMBOS="plain compile" REPEATS=2 bash scripts/gpu_fast.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
out=${OUT:-outputs/gpu-fast}
for dtype in ${DTYPES:-fp16 bf16}; do
  python benchmarks/step_cost.py --model sd15 --latent-size 64 --fast --device cuda --dtype "$dtype" \
    --errors difference linearized --combos ${COMBOS:-plain channels-last compile compile+channels-last} \
    --repeats "${REPEATS:-3}" --steps "${STEPS:-3}" --json "$out/$dtype.json"
done
