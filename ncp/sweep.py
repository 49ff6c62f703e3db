"""Collect a sweep's points into one table: the swept settings, final training metrics and, where the
point was evaluated, each reward's mean and win rate over the base model.

    python -m ncp.sweep outputs/sweep-beta        # writes summary.md and summary.csv there
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .errors import NcpError, run_cli
from .metrics import METRICS_FILE, read_metrics
from .models import LORA_FILE

TAIL = 10  # final metrics are means over the last TAIL logged steps: single steps are noisy


def point_row(point: Path) -> dict:
    rows = read_metrics(point)
    if not rows:
        raise NcpError(f"{point / METRICS_FILE} is empty")
    tail = rows[-TAIL:]
    row = {"point": point.name, "steps": rows[-1]["step"], "done": (point / LORA_FILE).exists()}
    for key in ("loss", "implicit_acc", "reward_w", "reward_l", "err_w"):
        if key in tail[0]:
            row[f"{key} (last {len(tail)})"] = sum(r[key] for r in tail) / len(tail)
    results = point / "eval" / "results.json"
    if results.exists():
        res = json.loads(results.read_text())
        for reward, entry in res["rewards"].items():
            for model, mean in entry["mean"].items():
                if model != res["baseline"]:
                    row[f"{reward} mean"] = mean
                    row[f"{reward} win rate vs {res['baseline']}"] = entry["win_rate"][model]["win_rate"]
                else:
                    row[f"{reward} mean ({model})"] = mean
    return row


def summarize(root: str | Path) -> list[dict]:
    root = Path(root)
    points = sorted(p for p in root.iterdir() if (p / METRICS_FILE).exists()) if root.is_dir() else []
    if not points:
        raise NcpError(f"{root}: no sweep points (folders with metrics.jsonl) found")
    rows = [point_row(p) for p in points]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(root / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    (root / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="the sweep's output folder (one sub-folder per point)")
    args = p.parse_args(argv)
    summarize(args.root)
    print((Path(args.root) / "summary.md").read_text())


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
