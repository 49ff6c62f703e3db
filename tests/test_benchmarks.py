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


@pytest.mark.parametrize("part", ["step", "errors"])
def test_step_cost_modes_run_each_mode_in_its_own_process(tmp_path, capsys, part):
    """--modes: one child process per perceptual-error mode; ratios to difference and latent DPO side by side."""
    step_cost = load("step_cost")
    out = tmp_path / "modes.json"
    modes = ["latent", "difference", "linearized-math", "linearized"] if part == "step" else ["difference", "linearized"]
    step_cost.main(["--model", "tiny-sd15", "--latent-size", "8", "--modes", *modes, "--part", part, "--warmup", "0",
                    "--repeats", "1", "--threads", "1", "--json", str(out)])
    rows = table_rows(capsys.readouterr().out)
    by = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(by) == modes and set(modes) <= set(rows)
    assert by["difference"]["time_vs_difference"] == 1.0 and by["difference"]["peak_vs_difference"] == 1.0
    for r in by.values():
        assert r["s_per_step"] > 0 and r["peak_gb"] > 0 and math.isfinite(r["loss"])
    if part == "step":
        assert by["latent"]["time_vs_latent"] == 1.0 and by["linearized"]["time_vs_latent"] > 0


def test_step_cost_fast_times_the_plain_and_the_fast_path(capsys):
    """--fast on the tiny U-Net, plain and compiled + channels-last (the graphs tests/test_fast.py compiles too)."""
    step_cost = load("step_cost")
    result = step_cost.run_fast("tiny-sd15", latent_size=16, repeats=1, threads=1, combos=[(False, False), (True, True)])
    rows = {(r["method"], r["compile"], r["channels_last"]): r for r in result["rows"]}
    assert set(rows) == {(m, c, c) for m in ("latent DPO", "NCP-DPO") for c in (False, True)}
    assert all(math.isfinite(r["s_per_step"]) and r["s_per_step"] > 0 and r["peak_gb"] > 0 for r in rows.values())
    assert rows[("NCP-DPO", False, False)]["ratio_to_plain"] == 1.0
    assert rows[("NCP-DPO", True, True)]["first_step_s"] > rows[("NCP-DPO", True, True)]["s_per_step"]  # it compiled
    assert result["setup"]["compiles"] >= 2 and result["setup"]["compile_s"] > 0
    table = step_cost.format_fast(result)
    assert table.count("| NCP-DPO |") == 2 and "vs plain" in table


def test_train_cost_times_the_training_command_from_the_cache(tmp_path, capsys):
    train_cost = load("train_cost")
    result = train_cost.main(["--model", "tiny", "--resolution", "32", "--pairs", "8", "--steps", "3", "--rounds", "2",
                              "--rank", "4", "--threads", "1", "--work", str(tmp_path), "--setting", "plain=",
                              "--setting", "cl=train.channels_last=true"])
    assert set(result["summary"]) == {"plain", "cl"} and result["summary"]["plain"]["ratio"] == 1.0
    for s in result["summary"].values():
        assert len(s["runs"]) == 2 and 0 < s["step_s"] < 60 and 0.1 < s["peak_gb"] < 20
        assert all(len(r["steps"]) == 3 for r in s["runs"])
    assert "| ncp NCP-DPO cl |" in capsys.readouterr().out


def test_toy_alignment_smoke_selects_on_validation_and_reports_intervals(tmp_path, capsys):
    toy = load("toy_alignment")
    out = tmp_path / "toy"
    result = toy.main(["--smoke", "--workers", "1", "--out", str(out)])
    text = capsys.readouterr().out
    # the selection rules are printed before the grid's choice and before any test number
    assert text.index("rule: grid") < text.index("chosen:") < text.index("| method |")
    split = result["split"]
    assert [len(split[k]) for k in ("train", "val", "test")] == list(toy.SPLIT)
    assert not (set(split["train"]) & set(split["val"]) or set(split["train"]) & set(split["test"])
                or set(split["val"]) & set(split["test"]))
    pairs = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert {p["prompt"] for p in pairs} <= set(split["train"])  # no preference pair shows a val/test caption
    # grid: every lr x beta multiplier for DPO/CPO, lr alone for SFT; the winner has the best validation reward
    cfg = toy.SMOKE
    for m in toy.OBJECTIVES:
        cands = [g for g in result["grid"] if g["method"] == m]
        assert len(cands) == len(cfg["lrs"]) * (1 if "SFT" in m else len(cfg["beta_mults"]))
        assert result["chosen"][m]["val_reward"] == max(g["val_reward"] for g in cands)
    for m in ("NCP-DPO bf16 difference", "NCP-DPO bf16 linearized"):
        assert result["chosen"][m] == result["chosen"]["NCP-DPO"]  # precision rows differ in precision alone
    rows = table_rows(text)
    methods = list(toy.METHODS)
    assert set(methods) <= set(rows) and {"DPO", "CPO", "SFT"} <= set(rows)
    summary = result["summary"]["methods"]
    for m in methods:
        assert sum(r["method"] == m for r in result["runs"]) == cfg["seeds"]
        points = summary[m]["points"]
        assert [p["step"] for p in points] == [0, 1, 2]
        assert points[0]["gain"] == 0 and points[0]["reward"] == pytest.approx(result["base_test_reward"])
        for p in points:
            assert p["low"] <= p["reward"] <= p["high"] and p["gain_low"] <= p["gain"] <= p["gain_high"]
            assert 0 <= p["reward"] <= 1
        assert points[-1]["seconds"] > 0
        assert len(numbers(rows[m][2:3])) == 3  # gain [low, high]
    for c in result["summary"]["comparisons"]:
        assert c["equal_steps"][1] <= c["equal_steps"][0] <= c["equal_steps"][2]
        assert 0 < c["seconds"] <= max(summary[c["ncp"]]["final"]["seconds"], summary[c["latent"]]["final"]["seconds"])
    assert result["test_images"] == len(split["test"]) * cfg["img_seeds"]
    assert (out / "curves.png").stat().st_size > 0 and (out / "table.md").is_file()
    assert json.loads((out / "toy_alignment.json").read_text())["command"].endswith("--smoke --workers 1 --out " + str(out))


def test_toy_alignment_statistics_by_hand():
    toy = load("toy_alignment")
    rng = __import__("numpy").random.default_rng(0)
    np = __import__("numpy")
    # a constant per-prompt value has a zero-width interval; the cluster mean averages seeds of one prompt
    assert toy.bootstrap(np.full(7, 0.25), rng) == (0.25, 0.25, 0.25)
    scores = np.array([[[0.0, 1.0], [2.0, 4.0]]])  # 1 training seed, 2 prompts, 2 image seeds
    assert toy.per_prompt(scores).tolist() == [0.5, 3.0]
    m, lo, hi = toy.bootstrap(np.array([0.0, 1.0] * 50), rng)
    assert m == 0.5 and 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # +-1.96 x 0.05
    # equal compute: linear between the checkpoints around the time, the last checkpoint past the end
    curve = {0: np.array([0.0]), 10: np.array([1.0]), 20: np.array([3.0])}
    seconds = {0: 0.0, 10: 4.0, 20: 6.0}
    assert toy.at_time(curve, seconds, 2.0).tolist() == [0.5]
    assert toy.at_time(curve, seconds, 5.0).tolist() == [2.0]
    assert toy.at_time(curve, seconds, 9.0).tolist() == [3.0]


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


def test_train_profile_splits_the_real_steps_into_phases(tmp_path, tiny_sd15, capsys):
    import ncp.train

    train_profile = load("train_profile")
    encode = ncp.train.encode
    summary = train_profile.main(["--steps-from", "2", "--json", str(tmp_path / "p.json"), "--",
                                  "--config", str(ROOT / "configs/tiny_sd15_ncp_dpo.yaml"), f"model.pretrained={tiny_sd15}",
                                  f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.grad_accum=2",
                                  "train.validation_prompts=[]", "train.report_to=none", "data.toy_num_pairs=8"])
    phases = summary["phases"]
    assert summary["steps"] == 2 and ncp.train.encode is encode  # the originals are back
    for name in ("data", "encode (VAE, text)", "objective forward", "  denoiser, policy", "  denoiser, reference",
                 "  f (perceptual errors)", "backward", "optimizer"):
        assert phases[name][0] > 0, name
    inside = sum(phases[n][0] for n in ("data", "encode (VAE, text)", "objective forward", "backward", "optimizer"))
    assert inside <= phases["step"][0] and phases["rest of the step"][0] >= 0
    nested = sum(phases[n][0] for n in ("  denoiser, policy", "  denoiser, reference", "  f (perceptual errors)"))
    assert nested <= phases["objective forward"][0]
    assert len(json.loads((tmp_path / "p.json").read_text())["steps"]) == 3
    assert "| **whole step** |" in capsys.readouterr().out
