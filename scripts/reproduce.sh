#!/usr/bin/env bash
# The paper's Table 1 and Figure 3 in one command, staged: prepare, train NCP-DPO and latent DPO, generate,
# score, curves, report. A stage whose output exists is skipped, so a stopped run continues by rerunning.
#
#   scripts/reproduce.sh sd15|sdxl|tiny [OUT]      # settings: configs/reproduce/<model>.yaml, OUT default outputs/repro-<model>
#   scripts/reproduce.sh tiny                       # every stage offline on a CPU in minutes (toy base, toy pairs, toy reward)
#   SETTINGS=my.yaml scripts/reproduce.sh sd15 OUT  # a copy of the settings, shrunk (fewer pairs, steps or prompts)
#
# It prints an estimate of each stage's GPU time first; the result is OUT/report.md. Env: PYTHON (default
# .venv/bin/python when present, else python).
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || { sed -n 2,10p "$0"; exit 2; }
case $1 in sd15|sdxl|tiny) ;; *) echo "error: model must be sd15, sdxl or tiny, got '$1'" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python)}
settings=${SETTINGS:-$root/configs/reproduce/$1.yaml}
out=${2:-outputs/repro-$1}
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m ncp.reproduce --settings "$settings" --out "$out"
