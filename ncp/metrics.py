"""`metrics.jsonl`: one JSON line per logged optimizer step of a run (loss, implicit accuracy, rewards, raw
errors, lr, grad norm, counters, samples/s). Written by `ncp.run.Run`, read here for curves, hub and sweeps."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import NcpError

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; [] when there is none. NcpError names the file and line of a bad row."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise NcpError(f"{path}, line {n}: not JSON ({e})") from e
    return rows


def read_progress(path: str | Path) -> list:
    """The JSON lines of a progress file that a job appends to as its work finishes (generate, evaluate, curves);
    [] when there is none. A line that a crash cut short (the last) is left out: that work is done again."""
    path, rows = Path(path), []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def write_metrics(run_dir: str | Path, rows: list[dict], append: bool = False) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a" if append else "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
