"""scripts/reproduce.sh end to end, offline: the tiny SD1.5 model, a local Pick-a-Pic-schema folder standing in
for the hub mirror (read by the same streaming code), the toy reward standing in for PickScore."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from ncp.errors import NcpError

ROOT = Path(__file__).resolve().parent.parent


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def toy_mirror(root: Path) -> str:
    """Toy pairs in the Pick-a-Pic schema: 4 winners beat two losers each (absolute winners: 8 pairs), one tie,
    one pair the filter drops."""
    from ncp.data.toy import toy_pair

    rows = []
    for i in range(4):
        cap, w, l = toy_pair(0, i, 32)
        l2 = toy_pair(0, i + 50, 32)[2]
        rows += [(cap, f"w{i}", f"l{i}", 1.0, 0.0, png(w), png(l)), (cap, f"m{i}", f"w{i}", 0.0, 1.0, png(l2), png(w))]
    rows.append((rows[0][0], "l0", "m0", 0.5, 0.5, rows[0][6], rows[1][5]))  # a tie
    rows.append((rows[0][0], "l1", "m1", 1.0, 0.0, rows[2][6], rows[3][5]))  # l1 wins once: not an absolute winner
    df = pd.DataFrame(rows, columns=["caption", "image_0_uid", "image_1_uid", "label_0", "label_1", "jpg_0", "jpg_1"])
    (root / "mirror" / "data").mkdir(parents=True)
    df.to_parquet(root / "mirror" / "data" / "train-00000-of-00001.parquet")
    return str(root / "mirror")


def settings(tmp_path: Path, model: str) -> Path:
    from ncp.data.toy import toy_prompts

    (tmp_path / "prompts.txt").write_text("\n".join(toy_prompts(3, seed=7)) + "\n")
    s = {
        "model": model, "resolution": 32, "device": "cpu",
        "prepare": {"source": "hub", "path": toy_mirror(tmp_path), "filter": "absolute_winners", "shard_size": 4,
                    "cache": True},
        "train": {"launch": "python", "runs": {
            "ncp_dpo": {"script": "train_ncp_dpo.py", "config": "configs/tiny_sd15_ncp_dpo.yaml"},
            "latent_dpo": {"script": "train_ncp_dpo.py", "config": "configs/tiny_sd15_latent_dpo.yaml"}},
            "overrides": ["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1", "lora.rank=4",
                          "optim.optimizer=adamw", "train.report_to=none", "train.validation_prompts=[]",
                          "optim.lr=0.05"]},
        "generate": {"seeds": [0, 1], "steps": 2, "batch_size": 6, "resolution": 32,
                     "prompt_sets": {"toy": {"prompts": str(tmp_path / "prompts.txt")}}},
        "score": {"rewards": ["toy", "imagereward"]},
        "curves": {"prompts": str(tmp_path / "prompts.txt"), "seeds": [0], "reward": "toy"},
        "estimate": {"train_step": 36, "image": 2.0, "score": 0.5},
    }
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(s, sort_keys=False))  # run order matters: first vs second
    return path


def test_reproduce_end_to_end_equals_the_stages_by_hand(tiny_sd15, tmp_path, one_torch_thread):
    from ncp.evaluate import main as evaluate_main
    from ncp.generate import main as generate_main

    path, out = settings(tmp_path, str(tiny_sd15)), tmp_path / "out"
    env = {**os.environ, "SETTINGS": str(path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), "sd15", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the GPU-time estimate comes first: 2 runs x 2 steps x 36 s = 0.04 h; 3 prompts x 2 seeds x 3 models x 2 s = 0.01 h
    assert proc.stdout.index("estimated GPU time per stage") < proc.stdout.index("stage prepare: ran")
    assert "train         0.04 h" in proc.stdout and "generate      0.01 h" in proc.stdout

    # stage outputs: 8 absolute-winner pairs prepared and cached, both runs trained on them for 2 steps
    stats = json.loads((out / "data" / "prepare.json").read_text())["stats"]
    assert (stats["rows"], stats["ties"], stats["dropped_by_filter"], stats["pairs"]) == (10, 1, 1, 8)
    for run in ("ncp_dpo", "latent_dpo"):
        cfg = yaml.safe_load((out / "runs" / run / "config.yaml").read_text())
        assert cfg["data"]["path"] == str(out / "data" / "pairs") and cfg["data"]["cache_dir"] == str(out / "data" / "cache")
        assert cfg["train"]["max_steps"] == 2 and cfg["train"]["seed"] == 0
    report = (out / "report.md").read_text()
    assert "| ncp_dpo vs base |" in report and "| latent_dpo vs base |" in report and "| ncp_dpo vs latent_dpo |" in report
    assert "Skipped imagereward" in report and "![curves](curves/curves.png)" in report
    assert (out / "curves" / "curves.png").exists() and (out / "grids" / "toy.png").exists()
    for st in ("prepare", "train", "generate", "score", "curves"):
        assert f"| {st} | " in report and f"stage {st}: ran" in proc.stdout

    # by hand: training NCP-DPO on the prepared data with the README's command gives the same LoRA ...
    hand = tmp_path / "hand"
    s = yaml.safe_load(path.read_text())
    cmd = [sys.executable, str(ROOT / "train_ncp_dpo.py"), "--config", str(ROOT / "configs/tiny_sd15_ncp_dpo.yaml"),
           f"model.pretrained={tiny_sd15}", "data.source=parquet", f"data.path={out / 'data' / 'pairs'}",
           f"data.cache_dir={out / 'data' / 'cache'}", "data.resolution=32", *s["train"]["overrides"],
           f"train.output_dir={hand / 'run'}"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (hand / "run", out / "runs" / "ncp_dpo"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and the same generation and scoring commands on the trained LoRAs give the same numbers
    generate_main(["--model", str(tiny_sd15), "--lora", f"ncp_dpo={out / 'runs' / 'ncp_dpo'}",
                   f"latent_dpo={out / 'runs' / 'latent_dpo'}", "--prompts", str(tmp_path / "prompts.txt"),
                   "--seeds", "0", "1", "--steps", "2", "--resolution", "32", "--batch-size", "6", "--device", "cpu",
                   "--out", str(hand / "gen")])
    evaluate_main(["--index", str(hand / "gen" / "index.jsonl"), "--reward", "toy", "--device", "cpu",
                   "--out", str(hand / "eval")])
    by_hand = json.loads((hand / "eval" / "results.json").read_text())["rewards"]["toy"]
    numbers = json.loads((out / "report.json").read_text())["toy"]["rewards"]["toy"]
    for run in ("ncp_dpo", "latent_dpo"):
        assert numbers[f"{run} vs base"] == by_hand["win_rate"][run]
    hand_scores = [json.loads(l) for l in (hand / "eval" / "scores.jsonl").read_text().splitlines()]
    repro_scores = [json.loads(l) for l in (out / "eval" / "toy" / "scores.jsonl").read_text().splitlines()]
    assert [r["toy"] for r in hand_scores] == [r["toy"] for r in repro_scores]
    assert len({r["toy"] for r in repro_scores}) > 1  # the numbers are not all equal by accident

    # a rerun skips every stage (nothing is trained or rendered again) and writes the same numbers
    lora = out / "runs" / "ncp_dpo" / "pytorch_lora_weights.safetensors"
    mtime = lora.stat().st_mtime_ns
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), "sd15", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for st in ("prepare", "train", "generate", "score", "curves"):
        assert f"stage {st}: skipped (output exists)" in proc.stdout
    assert lora.stat().st_mtime_ns == mtime
    assert json.loads((out / "report.json").read_text())["toy"]["rewards"]["toy"] == numbers


def test_settings_are_checked_before_any_stage(tmp_path):
    from ncp.reproduce import reproduce

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "m", "prepare": {}, "train": {}, "generate": {}, "score": {},
                                   "curves": {}, "extra": 1}))
    with pytest.raises(NcpError, match=r"bad.yaml: unknown key 'extra'"):
        reproduce(bad, tmp_path / "out")
    s = yaml.safe_load(bad.read_text())
    del s["extra"]
    s["train"] = {"runs": {"a": {"script": "train_ncp_dpo.py", "config": "configs/tiny_sd15_ncp_dpo.yaml"}}}
    bad.write_text(yaml.safe_dump(s))
    with pytest.raises(NcpError, match="train.runs needs two runs"):
        reproduce(bad, tmp_path / "out")
    s["train"]["runs"]["b"] = {"script": "train_ncp_dpo.py", "config": "configs/tiny_sd15_latent_dpo.yaml",
                               "overrides": ["train.max_steps=7"]}
    s["prepare"] = {"path": "x"}
    bad.write_text(yaml.safe_dump(s))
    with pytest.raises(NcpError, match="train.runs.b: must train with the same data, steps, seed"):
        reproduce(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "data").exists()  # refused before the prepare stage


def test_shipped_settings_resolve(tmp_path):
    from ncp.reproduce import estimate, load_settings, resolved_runs

    for name in ("sd15", "sdxl"):
        s = load_settings(ROOT / "configs" / "reproduce" / f"{name}.yaml")
        cfgs = resolved_runs(s, tmp_path)
        assert [c.objective.space for c in cfgs.values()] == ["perceptual", "latent"]
        assert {c.train.batch_size * c.train.grad_accum * 8 for c in cfgs.values()} == {512}  # the paper's, on 8 GPUs
        # every checkpoint stays: the curves' points (the default keeps the last 3)
        assert all(c.train.keep_checkpoints >= c.train.max_steps // c.train.checkpoint_every for c in cfgs.values())
        est = estimate(s, cfgs, {"parti": 1632, "pickapic_test_unique": 500, "hpsv2": 3200})
        assert est["train"] > 0 and est["generate"] > 0


def test_reproduce_tiny_runs_every_stage_offline(tmp_path):
    """`bash scripts/reproduce.sh tiny`: the shipped settings on the toy base, toy pairs in the Pick-a-Pic schema,
    the held-out toy captions and the toy reward; no network, no settings file of the user's."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    env.pop("SETTINGS", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), "tiny", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads((out / "data" / "prepare.json").read_text())["stats"]["pairs"] == 64
    for run in ("ncp_dpo", "latent_dpo"):
        cfg = yaml.safe_load((out / "runs" / run / "config.yaml").read_text())
        assert cfg["model"]["pretrained"] == str(out / "base") and cfg["train"]["max_steps"] == 6
    scores = [json.loads(line) for line in (out / "eval" / "toy" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 18 * 3 and all(0 <= r["toy"] <= 1 for r in scores)  # 18 held-out captions x 3 models
    report = (out / "report.md").read_text()
    assert "| ncp_dpo vs base |" in report and "| ncp_dpo vs latent_dpo |" in report
    assert (out / "curves" / "curves.png").exists() and (out / "grids" / "toy.png").exists()


def test_a_stage_made_with_other_settings_is_refused_not_reused(tmp_path):
    from ncp.reproduce import made_with

    folder, settings = tmp_path / "gen" / "parti", dict(seeds=[0, 1], loras={"a": 1})
    assert not made_with(folder, "index.jsonl", settings)  # nothing yet: the stage runs
    (folder / "index.jsonl").write_text("{}\n")
    assert made_with(folder, "index.jsonl", settings)  # the same settings: reused
    with pytest.raises(NcpError, match=r"gen/parti: made with other settings or inputs \(loras, seeds changed\)"):
        made_with(folder, "index.jsonl", dict(seeds=[0], loras={"a": 2}))
    (folder / "made_with.json").unlink()  # output from before stages recorded their settings
    assert made_with(folder, "index.jsonl", dict(seeds=[0]))


def test_generate_stage_reruns_cleanly_with_several_prompt_sets(tmp_path, monkeypatch):
    """Every prompt set's folder records the same inputs (the LoRA files' times), so a rerun reuses all of them."""
    import ncp.generate
    import ncp.reproduce as rp

    rendered = []

    def fake_generate(model, loras, prompts, folder, *a, **k):
        rendered.append((Path(folder).name, list(loras)))
        Path(folder, "index.jsonl").write_text("{}\n")

    monkeypatch.setattr(ncp.generate, "generate", fake_generate)
    monkeypatch.setattr(rp, "pipeline", lambda s, cache: None)
    for run in ("a", "b"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    s = {"model": "m", "train": {"runs": {"a": {}, "b": {}}},
         "generate": {"seeds": [0], "prompt_sets": {"one": {"prompts": "toy"}, "two": {"prompts": "toy"}}}}
    assert rp.stage_generate(s, tmp_path, {}) and [r[0] for r in rendered] == ["one", "two"]
    assert rendered[1][1] == [f"a={tmp_path / 'runs' / 'a'}", f"b={tmp_path / 'runs' / 'b'}"]
    assert not rp.stage_generate(s, tmp_path, {}) and len(rendered) == 2  # both reused
    s["generate"]["seeds"] = [0, 1]
    with pytest.raises(NcpError, match=r"gen/one: made with other settings or inputs \(seeds changed\)"):
        rp.stage_generate(s, tmp_path, {})
