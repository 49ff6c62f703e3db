#!/usr/bin/env bash
# Run a grid of training runs, one output folder per point, then collect one summary table.
#
#   scripts/sweep.sh OUT_ROOT SCRIPT CONFIG key=v1,v2 [key2=a,b ...] [-- fixed overrides ...]
#   scripts/sweep.sh outputs/sweep-beta train_ncp_dpo.py configs/tiny_sd15_ncp_dpo.yaml \
#       objective.beta=1e5,1e6 objective.space=perceptual,latent -- train.max_steps=20
#
# Every combination runs as OUT_ROOT/<key=value,...>; a point whose final LoRA exists (written when its run
# finished) is not trained again, so a stopped sweep is continued by running the same command again (each point
# resumes from its latest checkpoint). With EVAL_PROMPTS=<file, one prompt per line> each point without
# eval/results.json is rendered at fixed seeds and scored with EVAL_REWARD (default pickscore; "toy" for the
# built-in toy data) against the base model.
# Env: LAUNCH (default "accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no";
# the precision is train.mixed_precision, -q keeps a failing run to its one `error:` line).
set -euo pipefail
[ $# -ge 4 ] || { sed -n 2,15p "$0"; exit 2; }
out_root=$1 script=$2 config=$3
shift 3
grids=() fixed=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; fixed=("$@"); break; fi
  case "$1" in *=*) grids+=("$1");; *) echo "sweep: grid entry '$1' must look like key=v1,v2" >&2; exit 2;; esac
  shift
done
LAUNCH=${LAUNCH:-"accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"}

# cartesian product of the grids: each combination is a space-separated list of key=value
points=("")
for grid in "${grids[@]}"; do
  key=${grid%%=*} values=${grid#*=} next=()
  IFS=, read -r -a vals <<< "$values"
  for p in "${points[@]}"; do for v in "${vals[@]}"; do next+=("${p:+$p }$key=$v"); done; done
  points=("${next[@]}")
done

mkdir -p "$out_root"
for p in "${points[@]}"; do
  name=$(echo "$p" | tr ' ' ',')
  dir="$out_root/$name"
  if [ -f "$dir/pytorch_lora_weights.safetensors" ]; then  # written only when its run finished
    echo "sweep: $name trained"
  else
    echo "sweep: $name"
    # shellcheck disable=SC2086  # $p and $LAUNCH are word lists on purpose
    $LAUNCH "$script" --config "$config" $p "${fixed[@]}" "train.output_dir=$dir" train.resume_from=latest
  fi
  if [ -n "${EVAL_PROMPTS:-}" ] && [ ! -f "$dir/eval/results.json" ]; then  # an evaluation that failed runs again
    model=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['model']['pretrained'])" "$dir/config.yaml")
    python -m ncp.generate --model "$model" --lora "$dir" --prompts "$EVAL_PROMPTS" --seeds 0 1 \
      --out "$dir/eval/images" ${EVAL_GENERATE_ARGS:-}
    python -m ncp.evaluate --index "$dir/eval/images/index.jsonl" --reward "${EVAL_REWARD:-pickscore}" --out "$dir/eval"
  fi
done
python -m ncp.sweep "$out_root"
