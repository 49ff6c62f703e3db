#!/usr/bin/env bash
# What the CPU tests cannot cover, on one GPU in at most 8 minutes (benchmarks/gpu_check.py): fp16 resume
# exactness, peak memory / MFU per encoder.error at the paper configs' per-GPU batch (SD1.5 512 px, SDXL and
# SD3.5 Medium 1024 px), fp16 gradient fidelity, host syncs per micro-step, precision.py on CUDA, the fast path.
# Writes benchmarks/gpu/gpu_check.md and .json, or into --out DIR (first after checking that ncp's packages import,
# then again after every stage); exit code 0 = no stage failed, 2 = a package that every stage needs does not import (no stage run).
#   bash scripts/gpu_check.sh                          # on the GPU machine
#   bash scripts/gpu_check.sh --out /some/dir --budget-s 450  # the report where the caller collects it
#   bash scripts/gpu_check.sh --dry-run                # on CPU, tiny models: every default stage runs (minutes)
#   bash scripts/gpu_check.sh --stages resume fidelity # a subset
#   bash scripts/gpu_check.sh --stages toy --budget-s 520  # a run of its own: the toy benchmark's larger toy
#                                                      # (toy_alignment.py --device cuda); its files go to --out
# On a machine without ncp's packages (the lent GPU machines: no diffusers, bitsandbytes or datasets, and no
# registry to fetch them from), make the kit here first (python scripts/gpu_kit.py) and carry .gpu-kit along:
# this script installs it before anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if compgen -G ".gpu-kit/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ncp-kit .gpu-kit/*.whl
  export PYTHONPATH="/tmp/ncp-kit${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py "$@"
