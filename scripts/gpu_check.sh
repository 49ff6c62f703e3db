#!/usr/bin/env bash
# What the CPU tests cannot cover, on one GPU in at most 8 minutes (benchmarks/gpu_check.py): fp16 resume
# exactness, peak memory / MFU per encoder.error at the paper configs' per-GPU batch (SD1.5 512 px, SDXL and
# SD3.5 Medium 1024 px), fp16 gradient fidelity, host syncs per micro-step, precision.py on CUDA, the fast path.
# Writes benchmarks/gpu/gpu_check.md and .json; exit code 0 = no stage failed.
#   bash scripts/gpu_check.sh                          # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run                # on CPU, tiny models: every default stage runs (minutes)
#   bash scripts/gpu_check.sh --stages resume fidelity # a subset
#   bash scripts/gpu_check.sh --stages toy --budget-s 660  # then, with 11 minutes to spare: the toy benchmark's
#                                                      # larger toy (toy_alignment.py --device cuda), not a default stage
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python benchmarks/gpu_check.py "$@"
