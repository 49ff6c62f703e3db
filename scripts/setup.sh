#!/usr/bin/env bash
# Creates .venv with the pinned stack. torch is installed first and pinned by constraints.txt,
# so no other package can pull a different torch (that would download GBs of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || { echo "ncp setup: creating .venv"; "$PYTHON" -m venv .venv; }
. .venv/bin/activate
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "ncp setup: installing torch 2.13.0 into .venv (about 30 s; log: .venv/pip.log)"
  pip install -q torch==2.13.0 > .venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }
fi
echo "ncp setup: installing requirements.txt into .venv: diffusers, transformers, peft, accelerate, bitsandbytes," \
     "datasets, tensorboard... (about 80 s the first time, seconds after; log: .venv/pip.log)"
pip install -q -r requirements.txt -c constraints.txt > .venv/pip.log 2>&1 || { cat .venv/pip.log; exit 1; }
python -c "import ncp, torch, diffusers, peft, accelerate; print(f'ncp setup: torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}')"
