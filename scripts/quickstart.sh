#!/usr/bin/env bash
# Sets up .venv, writes the built-in tiny SD1.5 pipeline and runs NCP-DPO on the built-in toy pairs
# (CPU, offline, a few minutes). Extra arguments are config overrides, e.g. train.max_steps=10.
# Each run starts over in outputs/tiny-sd15-ncp-dpo (train.overwrite=true) unless you pass train.resume_from=latest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f outputs/tiny-sd15/model_index.json ]; then
  echo "quickstart: writing the tiny SD1.5 pipeline (random weights) to outputs/tiny-sd15"
  python -m ncp.tiny --arch sd15 --out outputs/tiny-sd15
fi
case " $* " in *" train.resume_from="*) fresh=() ;; *) fresh=(train.overwrite=true) ;; esac
echo "quickstart: training NCP-DPO on the toy pairs into outputs/tiny-sd15-ncp-dpo"
accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_ncp_dpo.py --config configs/tiny_sd15_ncp_dpo.yaml "${fresh[@]}" "$@"
echo "LoRA, metrics.jsonl, checkpoints and validation grids: outputs/tiny-sd15-ncp-dpo/"
