#!/usr/bin/env bash
# Sets up .venv, writes the built-in tiny SD1.5 pipeline and runs NCP-DPO on the built-in toy pairs
# (CPU, offline, a few minutes). Extra arguments are config overrides, e.g. train.max_steps=10.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -f outputs/tiny-sd15/model_index.json ] || python -m ncp.tiny --arch sd15 --out outputs/tiny-sd15
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_ncp_dpo.py --config configs/tiny_sd15_ncp_dpo.yaml "$@"
echo "LoRA, metrics.jsonl, checkpoints and validation grids: outputs/tiny-sd15-ncp-dpo/"
