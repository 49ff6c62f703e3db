#!/usr/bin/env bash
# Sets up .venv, then aligns a tiny model that has something to learn (CPU, offline, a few minutes): the toy base
# (a tiny SD1.5 pretrained on toy shapes with white and black backgrounds swapped in its captions, shipped in
# ncp/assets/) is trained with NCP-DPO on toy preference pairs through the normal entry point (accelerate launch
# train_ncp_dpo.py --config configs/quickstart_ncp_dpo.yaml), then scored on held-out captions. Each run writes a new folder
# outputs/quickstart/<date-time>/ (results.md, reward_curve.png, before_after.png, run/); earlier ones are kept.
# Extra arguments are config overrides of the training run, e.g. train.max_steps=40.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m ncp.quickstart "$@"
