"""Smoke runs of the two benchmarks through their main(argv), at tiny sizes, so they cannot rot."""

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

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


def test_step_cost_with_checkpointing_counts_the_models_flops_not_the_recomputation():
    """The paper configs' gradient checkpointing (the GPU check's cost stages): the step runs checkpointed, and its
    FLOPs are counted without the recomputation on one pair times the batch, which equals the whole batch's count."""
    step_cost = load("step_cost")
    kw = dict(model="tiny-sd15", latent_size=8, pairs=2, steps=1, warmup=1, repeats=1, threads=1,
              errors=("difference", "linearized"), losses=("dpo",))
    plain, checkpointed = step_cost.run(**kw), step_cost.run(**kw, checkpointing=True)
    assert checkpointed["setup"]["checkpointing"] and not plain["setup"]["checkpointing"]
    for a, b in zip(plain["rows"], checkpointed["rows"]):
        assert a["method"] == b["method"] and a["step_gflop"] == b["step_gflop"] > 0, (a, b)
        assert math.isfinite(b["loss"]) and b["s_per_step"] > 0


@pytest.mark.parametrize("part", ["step", "errors"])
def test_step_cost_modes_run_each_mode_in_its_own_process(tmp_path, capsys, part):
    """--modes: one child process per perceptual-error mode; ratios to difference and latent DPO side by side."""
    step_cost = load("step_cost")
    out = tmp_path / "modes.json"
    modes = ["latent", "difference", "linearized-math", "linearized"] if part == "step" else ["difference", "linearized"]
    step_cost.main(["--model", "tiny-sd15", "--latent-size", "8", "--modes", *modes, "--part", part, "--warmup", "0",
                    "--repeats", "1", "--threads", "1", "--json", str(out), *(["--checkpointing"] if part == "step" else [])])
    text = capsys.readouterr().out
    rows = table_rows(text)
    by = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(by) == modes and set(modes) <= set(rows)
    assert by["difference"]["time_vs_difference"] == 1.0 and by["difference"]["peak_vs_difference"] == 1.0
    for r in by.values():
        assert r["s_per_step"] > 0 and r["peak_gb"] > 0 and math.isfinite(r["loss"])
        phases = r["phases_s"]["forward"] + r["phases_s"]["backward"]  # the step's phases, timed inside its time
        assert 0 < phases <= r["mean_s"] and r["user_s"] > 0 and r["sys_s"] >= 0
    if part == "step":  # the paper configs' gradient checkpointing, in each child
        assert by["latent"]["time_vs_latent"] == 1.0 and by["linearized"]["time_vs_latent"] > 0
        assert json.loads(out.read_text())["setup"]["checkpointing"] and "checkpointing on" in text


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
    # grid: every lr x beta multiplier for DPO/CPO, lr alone for SFT (smoke: one value each, a fixed setting that
    # is never extended); the winner has the best validation reward of everything tried
    cfg = toy.SMOKE
    for m in toy.OBJECTIVES:
        cands = [g for g in result["grid"] if g["method"] == m]
        assert len(cands) == len(cfg["lrs"]) * (1 if "SFT" in m else len(cfg["beta_mults"]))
        assert result["chosen"][m]["val_reward"] == max(g["val_reward"] for g in cands)
        assert result["chosen"][m]["grid"] == "interior" and result["chosen"][m]["grid_axes"]["lr"]["edge"] is None
    for m in ("NCP-DPO bf16 difference", "NCP-DPO bf16 linearized"):
        assert result["chosen"][m]["lr"] == result["chosen"]["NCP-DPO"]["lr"]  # precision rows differ in precision alone
        assert result["chosen"][m]["beta"] == result["chosen"]["NCP-DPO"]["beta"]
    rows = table_rows(text[:text.index("Learning speed")])  # the methods table
    methods = list(toy.METHODS)
    assert set(methods) <= set(rows) and {"DPO", "CPO", "SFT"} <= set(table_rows(text))
    summary = result["summary"]["methods"]
    flops = result["flops_per_step"]
    assert flops["NCP-DPO"] > flops["latent DPO"] > flops["latent SFT"] > 0  # f's calls; SFT: winners, no reference
    assert flops["NCP-DPO bf16 difference"] == flops["NCP-DPO"]
    for m in methods:
        assert sum(r["method"] == m for r in result["runs"]) == cfg["seeds"]
        points = summary[m]["points"]
        assert [p["step"] for p in points] == [0, 1, 2] and [p["flops"] for p in points] == [0, flops[m], 2 * flops[m]]
        assert points[0]["gain"] == 0 and points[0]["reward"] == pytest.approx(result["base_test_reward"])
        for p in points:
            assert p["low"] <= p["reward"] <= p["high"] and p["gain_low"] <= p["gain"] <= p["gain_high"]
            assert 0 <= p["reward"] <= 1
        assert points[-1]["seconds"] > 0
        assert len(numbers(rows[m][3:4])) == 3  # gain [low, high]
        assert float(rows[m][5]) == pytest.approx(flops[m] / 1e9, rel=1e-3)  # the table's GFLOP/step is the JSON's
    speed = result["summary"]["speed"]
    assert speed["best"] == max(summary, key=lambda m: summary[m]["final"]["gain"])
    for frac in ("0.5", "0.8"):
        if speed["fractions"][frac]:
            for m, r in speed["fractions"][frac]["methods"].items():
                assert r["steps_low"] <= r["steps_high"] and 0 <= r["reached_share"] <= 1
                assert r["flops"] == r["steps"] * flops[m] or not math.isfinite(r["steps"])
    for c in result["summary"]["comparisons"]:
        assert c["equal_steps"][1] <= c["equal_steps"][0] <= c["equal_steps"][2]
        assert c["flops"] == min(2 * flops[c["ncp"]], 2 * flops[c["latent"]])
        assert c["equal_flops"][1] <= c["equal_flops"][0] <= c["equal_flops"][2]
    assert result["test_images"] == len(split["test"]) * cfg["img_seeds"]
    assert (out / "curves.png").stat().st_size > 0 and (out / "table.md").is_file()
    assert json.loads((out / "toy_alignment.json").read_text())["command"].endswith("--smoke --workers 1 --out " + str(out))
    ref = result["reference"]
    assert ref["chance"] < ref["loser"] < ref["winner"] == 1.0  # exact means: a one-attribute loser beats chance
    # rerun into the same folder: the base, every run and every run's scores are kept; only the base is scored again
    scored = []
    real = toy.score_images
    toy.score_images = lambda pipe, prompts, *a, **k: scored.append(len(prompts)) or real(pipe, prompts, *a, **k)
    try:
        again = toy.main(["--smoke", "--workers", "1", "--out", str(out)])
    finally:
        toy.score_images = real
    assert scored == [len(split["val"]), len(split["test"])]  # the base's validation and test images
    # toy_lr_check: the chosen setting gives back the run's tables from its own runs; another lr trains every seed
    # and changes that method's rows alone; the run's folder is not written
    check = load("toy_lr_check")
    before = sorted(str(f) for f in out.rglob("*"))
    same = check.main(["--run", str(out), "--method", "latent DPO", "--lr", "5e-4", "--workers", "1",
                       "--out", str(tmp_path / "same")])
    assert toy.jsonable(same["summary"]["methods"]["latent DPO"]["points"]) == toy.jsonable(
        result["summary"]["methods"]["latent DPO"]["points"])
    other = check.main(["--run", str(out), "--method", "latent DPO", "--lr", "2e-3", "--workers", "1",
                        "--out", str(tmp_path / "other")])
    assert [r["seed"] for r in other["runs"]] == list(range(cfg["seeds"])) and {r["lr"] for r in other["runs"]} == {2e-3}
    assert all(Path(r["run_dir"]).is_relative_to(tmp_path / "other") for r in other["runs"])
    assert other["summary"]["methods"]["latent DPO"]["points"] != same["summary"]["methods"]["latent DPO"]["points"]
    assert toy.jsonable(other["summary"]["methods"]["NCP-DPO"]) == toy.jsonable(result["summary"]["methods"]["NCP-DPO"])
    assert "replaced: lr 0.002" in (tmp_path / "other" / "table.md").read_text()
    assert sorted(str(f) for f in out.rglob("*")) == before
    assert toy.jsonable(again["summary"]) == toy.jsonable(result["summary"])  # as written (nan: no ratio, never equal)
    # the test runs that train come first (the grid trained seed 0 of the objectives), the precision rows (never in
    # the grid: no training time known) first of all
    trained = [("bf16" in r["method"], r["seed"] > 0 or "bf16" in r["method"]) for r in result["runs"]]
    assert trained == sorted(trained, reverse=True) and trained[-1] == (False, False)
    # each job's worker time is recorded: the first run trained and scored; the rerun did neither (its kept scores)
    first, rerun = result["minutes"], again["minutes"]
    assert first["worker_train"] > 0 and first["worker_score"] > 0
    assert all(r["work"]["train"] > 0 and r["work"]["score"] > 0 for r in result["runs"] if r["seed"] > 0)
    assert rerun["worker_train"] + rerun["worker_score"] < 0.2 * (first["worker_train"] + first["worker_score"])


@pytest.mark.parametrize("arch", ["sd15", "sd3", "flux"])
def test_toy_alignment_takes_the_shipped_base_where_its_pretraining_would_give_it(tmp_path, monkeypatch, arch):
    """Each arch's full and quick sizes pretrain with its shipped base's settings (but the cap), and it stopped by
    the rule before the full cap: they take it, written as a pipeline (the VAE's latent scale and shift too);
    other settings, or another arch's file, do not."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ncp import families
    from ncp.tiny import build_tiny_pipeline
    from ncp.generate import load_pipeline
    from ncp.toy_base import BASE_SETTINGS, base_file, shipped_base_info

    toy = load("toy_alignment")
    info = shipped_base_info(base_file(arch))
    assert info["arch"] == arch and info["stopped_by"] == "rule" and info["unet_steps"] < toy.FULL["base_max"]
    assert {k: toy.FULL[k] for k in BASE_SETTINGS if k != "base_max"} == {k: v for k, v in BASE_SETTINGS.items()
                                                                         if k != "base_max"}
    for cfg in (toy.SMOKE, dict(toy.FULL, base_lr=1e-3)):
        assert toy.shipped_base(tmp_path / "no", cfg, arch) is None
    other = "sd3" if arch == "sd15" else "sd15"
    with monkeypatch.context() as m:
        m.setattr(toy, "base_file", lambda a: base_file(other))
        assert toy.shipped_base(tmp_path / "no", toy.FULL, arch) is None
    with monkeypatch.context() as m:  # a base pretrained at other model settings (flux: another T5 length)
        m.setattr(toy, "toy_settings", lambda a: {"max_sequence_length": 77})
        assert toy.shipped_base(tmp_path / "no", toy.FULL, arch) is None
    assert not (tmp_path / "no").exists()
    base = toy.shipped_base(tmp_path / "quick", toy.QUICK, arch)
    assert base["unet_steps"] == info["unet_steps"] and base["history"] == info["history"]
    pipe = load_pipeline(str(tmp_path / "quick" / "base"))
    shipped = load_file(str(base_file(arch)))
    key = families.get(arch).denoiser_key
    assert all(torch.equal(v.float(), shipped[f"{key}.{k}"].float())
               for k, v in getattr(pipe, key).state_dict().items())
    build_tiny_pipeline(tmp_path / "tiny", arch, seed=0)
    tiny = load_pipeline(str(tmp_path / "tiny")).vae.config
    with safe_open(str(base_file(arch)), "pt") as f:
        meta = f.metadata()
    assert pipe.vae.config.scaling_factor == float(meta["vae_scaling_factor"]) != tiny.scaling_factor
    if arch != "sd15":  # the transformers' VAEs centre their latents too: pretraining's shift, not the tiny one
        assert pipe.vae.config.shift_factor == float(meta["vae_shift_factor"]) != tiny.shift_factor


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
    # equal compute: linear between the checkpoints around the cost, the last checkpoint past the end
    curve = {0: np.array([0.0]), 10: np.array([1.0]), 20: np.array([3.0])}
    cost = {0: 0.0, 10: 4.0, 20: 6.0}
    assert toy.at_cost(curve, cost, 2.0).tolist() == [0.5]
    assert toy.at_cost(curve, cost, 5.0).tolist() == [2.0]
    assert toy.at_cost(curve, cost, 9.0).tolist() == [3.0]
    # first step reaching a target: gain 0 at step 0, 0.2 at 20, 0.6 at 40 -> 0.4 is reached at step 30; 0.7 never
    steps, gains = [0, 20, 40], np.array([[0.0, 0.2, 0.6], [0.0, 0.5, 0.1]])
    assert toy.first_reach(steps, gains, np.array([0.4, 0.4])).tolist() == [30.0, 16.0]
    assert toy.first_reach(steps, gains[:1], np.array([0.7])).tolist() == [math.inf]


def test_toy_alignment_cuda_toy_builds_on_cpu(tmp_path):
    """--device cuda --dry-run: the larger toy's pipeline (64 px, a 4x wider U-Net) builds and one step is counted;
    without a CUDA device a real --device cuda run is refused with one line."""
    toy = load("toy_alignment")
    dry = toy.main(["--device", "cuda", "--dry-run", "--out", str(tmp_path)])
    from ncp.models import load_models

    unet = load_models(str(tmp_path / "dry-run")).unet
    assert unet.config.block_out_channels == [128, 256] and unet.config.sample_size == 32
    assert dry["denoiser_params"] == sum(p.numel() for p in unet.parameters())
    assert dry["flops_per_step"]["NCP-DPO"] > dry["flops_per_step"]["latent DPO"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            toy.main(["--device", "cuda", "--out", str(tmp_path)])


def test_toy_alignment_larger_toy_trains_and_scores_at_its_size(tmp_path):
    """The larger toy's path (what --device cuda runs at 64 px and 4x the width), through the GPU check's toy stage
    in its dry run: on the CPU at the smoke size, 48 px and twice the width. The base is pretrained at that size and
    width, not the shipped 32 px one; pairs, training and scoring use 48 px images; the base's settings name the
    size, so a base of another size is never reused."""
    from PIL import Image

    from ncp.models import load_models

    out = tmp_path / "toy"
    stage = load("gpu_check").stage_toy(dry=True, out=out, report_dir=tmp_path / "report")
    result = json.loads((out / "toy_alignment.json").read_text())
    # beside the GPU check's report: the log as written, the JSON and the table (a few files, not the run folders)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["toy.log", "toy_alignment.json", "toy_table.md"]
    assert json.loads((tmp_path / "report" / "toy_alignment.json").read_text()) == result
    assert "base" in (tmp_path / "report" / "toy.log").read_text()
    unet = load_models(str(out / "base")).unet
    assert unet.config.block_out_channels == [64, 128] and unet.config.sample_size == 24  # 2x the tiny U-Net's
    assert "shipped" not in result["base"]
    assert json.loads((out / "base.json").read_text())["settings"].items() >= {"resolution": 48, "width": 2}.items()
    pairs = [json.loads(line) for line in (out / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert Image.open(out / "pairs" / pairs[0]["chosen"]).size == (48, 48)
    assert {r["method"] for r in result["runs"]} == {"NCP-DPO"}
    for r in result["runs"]:
        assert "resolution: 48" in (Path(r["run_dir"]) / "config.yaml").read_text()
        assert all(len(v) == len(result["split"]["test"]) for v in r["scores"].values())
    assert result["setup"]["resolution"] == 48 and result["test_images"] == len(result["split"]["test"])
    assert stage["ok"] is None and set(stage["gains"]) == {"NCP-DPO"}  # the dry run measures, it does not judge
    assert stage["summary"].startswith("48 px, denoiser x2") and "| NCP-DPO |" in stage["summary"]


def test_toy_alignment_learning_speed_and_grid_extension_by_hand():
    toy = load("toy_alignment")
    np = __import__("numpy")
    # two methods, 3 seeds x 4 prompts, identical in every seed and prompt: zero-width intervals. "fast" ends at a
    # gain of 0.4 (the best), "slow" at 0.3. 50% of 0.4 = 0.2: fast at step 10, slow at 30 (0.1 at 20, 0.3 at 40);
    # 80% = 0.32: fast at step 16, slow never
    steps = [0, 20, 40]
    curves = {"fast": np.tile([0.0, 0.4, 0.4], (3, 4, 1)), "slow": np.tile([0.0, 0.1, 0.3], (3, 4, 1))}
    speed = toy.learning_speed(curves, steps, {"fast": 2, "slow": 1}, np.random.default_rng(0))
    assert speed["best"] == "fast" and speed["best_final_gain"] == pytest.approx(0.4)
    half, most = speed["fractions"]["0.5"]["methods"], speed["fractions"]["0.8"]["methods"]
    assert [half["fast"]["steps"], half["fast"]["flops"], half["slow"]["steps"]] == pytest.approx([10, 20, 30])
    assert half["fast"]["steps_low"] == pytest.approx(half["fast"]["steps_high"]) and half["slow"]["reached_share"] == 1.0
    assert most["fast"]["steps"] == pytest.approx(16)
    assert most["slow"]["steps"] == math.inf and most["slow"]["reached_share"] == 0.0  # 0.32 never reached
    assert toy.reach(most["slow"]["steps"]) == "not reached"
    # NCP over latent, paired: NCP-SFT at "fast"'s curve, latent SFT at "slow"'s: to 50%, 10 / 30 steps, and with
    # NCP's step twice the FLOPs, 20 / 30; to 80% only NCP gets there: ratio 0, first in every resample
    paired = toy.learning_speed({"NCP-SFT": curves["fast"], "latent SFT": curves["slow"]}, steps,
                                {"NCP-SFT": 2, "latent SFT": 1}, np.random.default_rng(0))
    r = paired["fractions"]["0.5"]["ncp_over_latent"]["SFT"]
    assert [r["steps"], r["steps_low"], r["steps_high"], r["steps"] * r["flop_ratio"]] == pytest.approx([1 / 3] * 3 + [2 / 3])
    assert r["ncp_first_share"] == 1.0 and r["defined_share"] == 1.0
    r = paired["fractions"]["0.8"]["ncp_over_latent"]["SFT"]
    assert r["steps"] == 0.0 and r["ncp_first_share"] == 1.0 and toy.ratio_text(math.inf) == "inf"
    # neither reaches: no ratio; only latent: inf
    r = toy.step_ratio(math.inf, math.inf, np.array([math.inf, 5.0]), np.array([math.inf, math.inf]), 1.0)
    assert math.isnan(r["steps"]) and r["defined_share"] == 0.5 and r["steps_low"] == 0.0
    assert toy.step_ratio(math.inf, 4.0, np.array([math.inf]), np.array([4.0]), 1.0)["steps"] == math.inf
    assert "SFT" not in speed["fractions"]["0.5"]["ncp_over_latent"]  # methods without a pair: no ratio
    # nothing gained: no target
    flat = toy.learning_speed({"a": np.zeros((3, 4, 3))}, steps, {"a": 1}, np.random.default_rng(0))
    assert flat["fractions"]["0.5"] is None
    # grid axes: an edge is the end of 2+ values tried; the next value keeps the grid's ratio
    assert toy.axis_edge(1e-3, [3e-4, 1e-3]) == "high" and toy.axis_edge(1e-3, [3e-4, 1e-3, 3e-3]) is None
    assert toy.axis_edge(5e-4, [5e-4]) is None  # a one-value axis is a fixed setting, not a search
    assert toy.beyond([1.0, 4.0], "high") == 16.0 and toy.beyond([1.0, 4.0], "low") == 0.25
    assert toy.beyond([3e-4, 1e-3], "high") == pytest.approx(3.33e-3)
    # the search extends past an edge until the best is interior, at most max_ext times per axis
    peak = {"A": 3e-3, "B": 1.0}  # validation reward peaks at lr 3e-3 for A; B keeps rising with lr

    def make_job(m, lr, mult):
        return dict(method=m, lr=lr, beta_mult=mult)

    def run(jobs):
        return [dict(j, val_reward=-abs(np.log(j["lr"] / peak[j["method"]]))) for j in jobs]

    first = [make_job(m, lr, None) for m in ("A", "B") for lr in (3e-4, 1e-3)]
    grids, runs = toy.search_grid(first, make_job, run, max_ext=2, log=lambda *_: None)
    assert grids["A"]["best"]["lr"] == 3.33e-3 and grids["A"]["axes"]["lr"]["edge"] is None
    assert grids["A"]["verdict"] == "interior after 2 extension(s)"  # 3.33e-3 was an edge until 1.11e-2 was tried
    assert grids["B"]["axes"]["lr"] == dict(values=[3e-4, 1e-3, 3.33e-3, 1.11e-2], edge="high", extensions=2, next=None)
    assert grids["B"]["verdict"] == "lr high edge after 2 extension(s)"
    assert len(runs) == 4 + 2 + 2
    # a pair that chose different lrs is flagged with the check that puts them at one lr; a pair at one lr is not
    chose = {"NCP-SFT": {"setting": {"lr": 1e-2}}, "latent SFT": {"setting": {"lr": 3.33e-2}}}
    note = toy.lr_caution({"methods": chose}, "NCP-SFT", "latent SFT")
    assert "(NCP-SFT 0.01, latent SFT 0.0333)" in note and "--method 'latent SFT' --lr 0.01 " in note
    chose["latent SFT"]["setting"]["lr"] = 1e-2
    assert toy.lr_caution({"methods": chose}, "NCP-SFT", "latent SFT") == ""


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


def test_toy_diagnose_trains_and_probes_a_toy_folder(tmp_path, capsys):
    """benchmarks/toy_diagnose.py train on a tiny pipeline: it prints a probe line whose LoRA has moved and whose
    held-out margin is a number; follow gives shares in [0, 1]."""
    from ncp.tiny import build_tiny_pipeline
    from ncp.toy_base import split_captions, write_train_pairs

    diag = load("toy_diagnose")
    build_tiny_pipeline(tmp_path / "base", "sd15")
    write_train_pairs(tmp_path, split_captions()["train"], 64)
    diag.main(["train", "--out", str(tmp_path), "--steps", "2", "--eval", "2", "--seeds", "1", "--lr", "1e-3"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step 2 ")][0]
    assert float(re.search(r"\|LoRA - init\| (\S+)", line)[1]) > 0 and "held_margin" in line
    shares = diag.follow(tmp_path / "base", seeds=1, steps=2)
    assert all(0 <= shares[k] <= 1 for k in ("colour", "shape", "background"))
