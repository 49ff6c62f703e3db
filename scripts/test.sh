#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (offline, CPU), in one pytest worker per core (at most 4; each test
# and its child processes on one torch thread): about 9 min on 2 cores, 16 in one process. Extra arguments go to
# pytest (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -n auto --maxprocesses 4 tests "$@"
