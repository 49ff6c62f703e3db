"""Smoke runs of the two benchmarks through their main(argv), at tiny sizes, so they cannot rot."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    """benchmarks/ is a folder of scripts, not a package: import one by path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows of the printed output: first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def numbers(cells: list[str]) -> list[float]:
    """Decimal numbers in table cells; a sign counts only where it does not join a range like 0.1-0.2."""
    return [float(x) for c in cells for x in re.findall(r"(?<![\d.])[-+]?\d+\.\d+", c)]


def test_step_cost_prints_every_method_with_finite_figures(tmp_path, capsys):
    step_cost = load("step_cost")
    out = tmp_path / "cost.json"
    result = step_cost.main(["--model", "tiny-sd15", "--latent-size", "8", "--steps", "1", "--warmup", "1",
                             "--repeats", "2", "--threads", "1", "--errors", "linearized", "fp32", "--json", str(out)])
    rows = table_rows(capsys.readouterr().out)
    methods = [m for m, *_ in step_cost.methods(["linearized", "fp32"])]
    assert "NCP-DPO linearized" in methods and "NCP-SFT fp32" in methods
    assert set(methods) <= set(rows)
    for m in methods:
        values = numbers(rows[m])
        assert len(values) == 7 and all(math.isfinite(v) and v > 0 for v in values), (m, rows[m])
    by = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert by["latent DPO"]["ratio"] == 1.0 and by["latent DPO"]["flop_floor"] == 1.0
    # the FLOP floors follow the cost model: NCP adds encoder work, CPO/SFT drop the reference / losers
    assert by["NCP-DPO"]["flop_floor"] > 1.0 > by["latent CPO"]["flop_floor"] > by["latent SFT"]["flop_floor"]
    assert by["NCP-DPO"]["flop_counted"] > 1.0 and by["latent SFT"]["flop_counted"] < 1.0
    # a jvp costs more than a forward: the linearized error's floor is above the difference's
    assert by["NCP-DPO linearized"]["flop_floor"] > by["NCP-DPO"]["flop_floor"] == by["NCP-DPO fp32"]["flop_floor"]
    assert 0 < result["setup"]["encoder_share"] < 1 and result["setup"]["loader_pairs_per_s"] > 0


def test_toy_alignment_smoke_scores_every_method(tmp_path, capsys):
    toy = load("toy_alignment")
    out = tmp_path / "toy"
    result = toy.main(["--smoke", "--out", str(out)])
    rows = table_rows(capsys.readouterr().out)
    methods = [m for m, _, _ in toy.METHODS]
    header = rows["step"]
    assert header == methods
    steps = [k for k in rows if k.isdigit()]
    assert steps == ["0", "1", "2"]  # base, then a checkpoint every step
    for k in steps + ["gain"]:
        assert len(numbers(rows[k])) == len(methods) and all(math.isfinite(v) for v in numbers(rows[k]))
    saved = json.loads((out / "toy_alignment.json").read_text())
    assert set(saved["curves"]["runs"]) == {toy.slug(m) for m in methods}
    assert all(0 <= r["reward"] <= 1 for rows_ in saved["curves"]["runs"].values() for r in rows_)
    assert set(saved["setup"]["betas"]) == {"perceptual", "latent"} and all(b > 0 for b in saved["setup"]["betas"].values())
    assert (out / "curves.png").stat().st_size > 0 and (out / "base" / "model_index.json").exists()
    assert result["reference"]["winner"] == 1.0


def test_precision_smoke_reports_every_row_and_a_decision(tmp_path, capsys):
    precision = load("precision")
    saved = precision.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    rows = table_rows(text)
    for dtype in precision.DTYPES:
        assert dtype in rows  # one table row per f precision and error mode, per model
    for name, r in saved["results"].items():
        assert [b for b in r["buckets"]] == ["0-99", "100-499", "500-999"]
        for bucket in r["buckets"].values():
            assert set(bucket) == {f"{d} {e}" for d in precision.DTYPES for e in precision.ERRORS}
            truth = bucket["float64 difference"]
            assert truth["err"] == 0 and truth["flip"] == 0 and truth["cos"] == pytest.approx(1.0)
            assert all(0 <= c["flip"] <= 1 and -1 - 1e-9 <= c["cos"] <= 1 + 1e-9 for c in bucket.values())
    assert set(saved["decision"]) == {"no", "fp16", "bf16"}
    assert (tmp_path / "precision.md").read_text().startswith("### toy")
