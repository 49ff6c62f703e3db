#!/usr/bin/env bash
# fp16 resume on a GPU, which the CPU tests cannot cover (accelerate has no GradScaler on CPU): the tiny SD1.5,
# 30 steps straight, then 15 steps + resume to 30, compared step by step (losses, loss scale, scaler skips) and
# on the final LoRA. Exit code 0 = the resumed run equals the straight one.
#   bash scripts/gpu_smoke.sh            # PRECISION=bf16 STEPS=6 bash scripts/gpu_smoke.sh runs it on CPU
# Bit-exact equality on a GPU also needs deterministic kernels; TOL (default 1e-4, relative) allows for cuDNN's.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false CUBLAS_WORKSPACE_CONFIG=:4096:8
PRECISION=${PRECISION:-fp16} STEPS=${STEPS:-30} TOL=${TOL:-1e-4}
out=${OUT:-outputs/gpu-smoke}
rm -rf "$out"
python -m ncp.tiny --arch sd15 --out "$out/tiny-sd15" > /dev/null
launch=(accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
        train_ncp_dpo.py --config configs/tiny_sd15_ncp_dpo.yaml "model.pretrained=$out/tiny-sd15"
        "train.mixed_precision=$PRECISION" train.checkpoint_every=10 train.validate_every=0 train.validation_steps=2
        objective.beta=50000 train.report_to=none)
"${launch[@]}" "train.output_dir=$out/straight" "train.max_steps=$STEPS"
"${launch[@]}" "train.output_dir=$out/resumed" "train.max_steps=$((STEPS / 2))"
"${launch[@]}" "train.output_dir=$out/resumed" "train.max_steps=$STEPS" train.resume_from=latest
python - "$out" "$TOL" <<'EOF'
import sys, torch
from safetensors.torch import load_file
from ncp.run import read_metrics
out, tol = sys.argv[1], float(sys.argv[2])
a, b = read_metrics(f"{out}/straight"), read_metrics(f"{out}/resumed")
assert [r["step"] for r in a] == [r["step"] for r in b], "different steps logged"
worst = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b))
same_scaler = all(x.get(k) == y.get(k) for x, y in zip(a, b) for k in ("loss_scale", "scaler_skips"))
la, lb = load_file(f"{out}/straight/pytorch_lora_weights.safetensors"), load_file(f"{out}/resumed/pytorch_lora_weights.safetensors")
lora = max(((la[k] - lb[k]).abs().max() / la[k].abs().max().clamp_min(1e-12)).item() for k in la)
print(f"steps {len(a)}, loss scale {a[-1].get('loss_scale')}, scaler skips {a[-1].get('scaler_skips')}, "
      f"bad steps {a[-1]['skipped_steps']}: max relative difference loss {worst:.3g}, LoRA {lora:.3g}; "
      f"loss scale and skips {'equal' if same_scaler else 'DIFFER'}")
ok = worst <= tol and lora <= tol and same_scaler
print("gpu smoke:", "resumed run equals the straight run" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
