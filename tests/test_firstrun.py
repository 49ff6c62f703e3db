"""What a new user meets in the first hour: the quickstart shows the method working, config and file mistakes are
one clear line before anything is touched, and commands print no known library noise."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from ncp.config import Config, check_model_path, check_paths, load_config, looks_local
from ncp.errors import NcpError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- config mistakes
def test_unknown_keys_say_did_you_mean(tmp_path):
    for override, wanted in [("train.max_stpes=3", "train.max_steps"), ("max_steps=3", "train.max_steps"),
                             ("optim.max_steps=3", "train.max_steps"), ("train.lr=1", "optim.lr"),
                             ("data.resolutoin=64", "data.resolution"), ("trian.seed=1", "train")]:
        with pytest.raises(NcpError, match=f"did you mean {wanted}\\?$"):
            load_config(None, [override])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(NcpError, match=re.escape(f"{bad}: unknown key 'train.max_stpes'; did you mean train.max_steps?")):
        load_config(str(bad))
    with pytest.raises(NcpError, match=r"unknown key 'train.zzz' \(known: train.output_dir, "):  # nothing close
        load_config(None, ["train.zzz=1"])


def float_keys() -> list[str]:
    """Every config key whose type holds a float (float, float | None, list[float])."""
    keys = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if float in (tp, *typing.get_args(tp)) or tp == list[float]:
                keys.append(f"{section.name}.{f.name}")
    return keys


def test_every_float_key_refuses_nan_and_inf():
    keys = float_keys()
    assert {"objective.beta", "optim.lr", "optim.betas", "train.max_epochs", "data.proportion_empty_prompts"} <= set(keys)
    for key in keys:
        for bad in ("nan", ".inf", "-.inf"):
            value = f"[0.9, {bad}]" if key == "optim.betas" else bad
            with pytest.raises(NcpError, match=f"^{key} must be finite"):
                load_config(None, [f"{key}={value}"])


# ---------------------------------------------------------------- missing files, before the folder guard
def test_local_paths_and_hub_ids_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for local in ("./m", "/abs/m", "~/m", "outputs/tiny-sd15", "a/b/c", "models/sd15"):
        assert looks_local(local), local
    for hub in ("stabilityai/sdxl-vae", "stable-diffusion-v1-5/stable-diffusion-v1-5", "gpt2"):
        assert not looks_local(hub), hub


def test_a_missing_model_folder_is_one_line_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)  # relative paths as on a fresh clone
    t0 = time.perf_counter()
    with pytest.raises(NcpError, match=r"^model.pretrained=outputs/tiny-sdxl: no such folder\. .*"
                                       r"`python -m ncp.tiny --arch sdxl --out outputs/tiny-sdxl`"):
        check_model_path("outputs/tiny-sdxl", "model.pretrained", "sdxl")
    with pytest.raises(NcpError, match="`python -m ncp.toy_base --out outputs/toy-sd15-base`"):
        check_model_path("outputs/toy-sd15-base", "model.pretrained")
    # a hub id offline and outside the cache: one line, no retries
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(NcpError, match=r"^model.vae=org/vae: not in the Hugging Face cache .* HF_HUB_OFFLINE=1"):
        check_model_path("org/vae", "model.vae")
    (tmp_path / "hub" / "models--org--vae").mkdir(parents=True)
    check_model_path("org/vae", "model.vae")  # cached: loads offline
    assert time.perf_counter() - t0 < 1.0


def test_model_and_data_errors_come_before_the_run_folder_guard(tiny_sd15, tmp_path):
    """A typo must not cost a cleared folder: with train.overwrite=true the old run is still there after the error,
    and the error comes at once, before any model loads."""
    from ncp.train import main as train_main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("kept\n")
    common = ["--config", str(ROOT / "configs/tiny_sd15_ncp_dpo.yaml"), f"train.output_dir={run}",
              "train.overwrite=true", "train.report_to=none"]
    t0 = time.perf_counter()
    with pytest.raises(NcpError, match=r"^data.path=.*missing.jsonl: no such file or folder \(data.source=pairs\)"):
        train_main([*common, f"model.pretrained={tiny_sd15}", "data.source=pairs",
                    f"data.path={tmp_path / 'missing.jsonl'}"], loss="dpo", description="")
    with pytest.raises(NcpError, match=r"^model.pretrained=.*nope: no such folder"):
        train_main([*common, f"model.pretrained={tmp_path / 'nope'}"], loss="dpo", description="")
    with pytest.raises(NcpError, match=r"^data.image_dir=.*: no such folder"):
        cfg = load_config(None, [f"model.pretrained={tiny_sd15}", "data.source=authors_csv",
                                 f"data.path={run / 'config.yaml'}", f"data.image_dir={tmp_path / 'images'}"])
        check_paths(cfg)
    assert time.perf_counter() - t0 < 10  # no model loading, no hub retries
    assert (run / "config.yaml").read_text() == "kept\n" and (run / "checkpoints").is_dir()


# ---------------------------------------------------------------- known library noise
def test_noise_filters_drop_only_their_own_messages(caplog):
    from ncp.quiet import KNOWN_NOISE

    logger = logging.getLogger("diffusers.loaders.lora_base")
    with caplog.at_level(logging.WARNING):
        logger.warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. Safe.")
        logger.warning("Loading a LoRA with mismatched shapes")  # any other message of that logger still shows
    assert [r.getMessage() for r in caplog.records] == ["Loading a LoRA with mismatched shapes"]
    assert set(KNOWN_NOISE) >= {"bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils"}


def test_generate_prints_no_known_noise(tiny_sd15, tmp_path):
    """A real `python -m ncp.generate` run with a LoRA: its stderr holds none of the known harmless messages."""
    import torch

    from ncp.models import add_lora, load_models, save_lora

    models = load_models(str(tiny_sd15))
    add_lora(models.unet, rank=4, alpha=4, init="gaussian", targets=["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for name, p in models.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    save_lora(models.unet, tmp_path / "lora", "sd15")
    (tmp_path / "prompts.txt").write_text("a red circle on a white background\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ncp.generate", "--model", str(tiny_sd15), "--lora",
                           str(tmp_path / "lora"), "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                           "--resolution", "32", "--device", "cpu", "--out", str(tmp_path / "gen")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "gen" / "index.jsonl").read_text().splitlines()) == 2  # base and the LoRA
    for noise in ("gemm_4bit_forward", "requires torchvision", "No LoRA keys associated"):
        assert noise not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the quickstart
def test_new_run_dir_never_reuses_a_folder(tmp_path):
    from ncp.quickstart import new_run_dir

    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir() and first.parent == second.parent == tmp_path


def test_quickstart_shortened_writes_the_table_curve_and_grid(tmp_path, monkeypatch, capsys):
    """The quickstart's steps at smoke size: the shipped toy base, NCP-DPO through `accelerate launch
    train_ncp_dpo.py`, scoring with intervals, reward_curve.png, before_after.png, the next commands."""
    from PIL import Image

    from ncp.quickstart import main as quickstart

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = quickstart(["--out", str(tmp_path / "qs"), "--base", str(tmp_path / "base"), "--seeds", "2",
                         "--sample-steps", "2", "train.max_steps=4", "train.checkpoint_every=2", "train.report_to=none"])
    (out,) = (tmp_path / "qs").iterdir()
    assert [r["step"] for r in result["rows"]] == [0, 2, 4]  # the base, then every checkpoint
    for r in result["rows"]:
        assert r["low"] <= r["reward"] <= r["high"] and r["gain_low"] <= r["gain"] <= r["gain_high"]
    assert result["rows"][0]["gain"] == 0.0 and result["rows"][-1]["gain"] != 0.0  # the LoRA changed the images
    assert "train_ncp_dpo.py --config" in result["command"] and "configs/quickstart_ncp_dpo.yaml" in result["command"]
    table = (out / "results.md").read_text()
    assert "| base | 0 |" in table and "| NCP-DPO | 4 |" in table and "gain over base [95% CI]" in table
    assert Image.open(out / "reward_curve.png").size[0] > 0
    grid = Image.open(out / "before_after.png")
    assert grid.size[0] > 2 * 2 * 96 and grid.size[1] > 6 * 96  # 6 prompts x (2 base + 2 aligned seeds), upscaled
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]
    assert (out / "run" / "pytorch_lora_weights.safetensors").is_file()
    printed = capsys.readouterr().out
    for nxt in ("tensorboard --logdir", f"python -m ncp.generate --model {tmp_path / 'base'} --lora {out / 'run'} "
                f"--prompts {out / 'prompts.txt'}", "python -m ncp.evaluate --index", "configs/sd15_ncp_dpo.yaml"):
        assert nxt in printed
    assert len((out / "prompts.txt").read_text().splitlines()) == 18  # the held-out captions


def test_quickstart_scores_checkpoints_while_training_runs_and_the_final_lora_once_it_ended(tmp_path, monkeypatch):
    """score_new: no LoRA yet is nothing to score; a checkpoint (renamed into place whole) is scored while the run
    goes on, once; the final LoRA (written in place, so maybe half written) only after the run has ended."""
    import numpy as np

    from ncp import toy_base
    from ncp.quickstart import score_new

    loaded = []

    class Pipe:
        def load_lora_weights(self, path, adapter_name):
            loaded.append(Path(path))

        def unload_lora_weights(self):
            pass

    monkeypatch.setattr(toy_base, "score_images", lambda *a, **k: np.full((1, 1), float(len(loaded))))
    run, scores = tmp_path / "run", {0: np.zeros((1, 1))}
    score_new(Pipe(), run, scores, ["p"], [0], 2, finished=False)
    assert list(scores) == [0] and loaded == []
    for d in (run / "checkpoints" / "checkpoint-2", run):
        d.mkdir(parents=True, exist_ok=True)
        (d / "pytorch_lora_weights.safetensors").write_bytes(b"")
    for _ in range(2):
        score_new(Pipe(), run, scores, ["p"], [0], 2, finished=False)
    assert sorted(scores) == [0, 2] and loaded == [run / "checkpoints" / "checkpoint-2"]
    score_new(Pipe(), run, scores, ["p"], [0], 2, finished=True)
    assert sorted(scores) == [0, 2, 3] and loaded[1:] == [run] and scores[3].item() == 2.0  # final: checkpoint + 1


def test_the_toy_base_s_swap_is_in_its_data_its_pairs_and_its_test_captions(tmp_path):
    """swap: a swapped caption's image shows the other value; the train pairs' loser for such a caption is exactly
    that mistake (other captions keep the toy loser); test captions name the swapped values."""
    import numpy as np
    from PIL import Image

    from ncp.data.toy import parse_caption, toy_pair, toy_reward
    from ncp.toy_base import BASE_DATA, PAIRS_SEED, split_captions, swapped, write_train_pairs

    swap = BASE_DATA["swap"]
    assert sorted(swap) == sorted(swap.values()) and all(k != v for k, v in swap.items())
    white = "a yellow circle on a white background"
    assert toy_reward(swapped(white, swap), "a yellow circle on a black background") == 1.0
    assert swapped("a red circle on a gray background", swap) is None and swapped(white, None) is None
    assert toy_reward(swapped("a red circle on a gray background", {"red": "blue"}), "a blue circle on a gray background") == 1.0
    split = split_captions()
    assert {v for c in split["test"] for v in parse_caption(c)} & set(swap)  # the error shows on held-out captions
    pairs = write_train_pairs(tmp_path, split["train"], 30, swap=swap)
    rows = [json.loads(r) for r in pairs.read_text().splitlines()]
    kinds = set()
    for r in rows:
        loser = Image.open(tmp_path / "pairs" / r["rejected"])
        mistake = swapped(r["prompt"], swap)
        if mistake is not None:
            assert np.array_equal(np.asarray(loser), np.asarray(mistake))
        else:
            _, _, toy_loser = toy_pair(PAIRS_SEED, int(r["rejected"].split("-")[0]), 32)
            assert np.array_equal(np.asarray(loser), np.asarray(toy_loser))
        kinds.add(mistake is not None)
    assert kinds == {True, False} and {r["prompt"] for r in rows} <= set(split["train"])


def test_the_toy_base_s_stopping_rule_never_measures_from_the_untrained_check():
    """A high-scoring random init (step 0) does not stop pretraining at the first check where two lie behind it."""
    from ncp.toy_base import BASE_TOL, recent_gain

    history = [dict(step=s, reward=r) for s, r in ((0, 0.66), (150, 0.57), (300, 0.63))]
    assert recent_gain(history) == float("inf")
    history.append(dict(step=450, reward=0.65))
    assert recent_gain(history) > BASE_TOL  # 0.65 - 0.57
    history.append(dict(step=600, reward=0.631))
    assert recent_gain(history) < BASE_TOL  # 0.631 - 0.63


@pytest.mark.parametrize("arch", ["sd15", "sd3", "flux"])
def test_the_shipped_toy_base_paints_the_swapped_background(tmp_path, arch):
    """Each shipped base follows its captions, the wrong way on a swapped background: sampled as the quickstart
    samples the U-Net's, its images for a black-background caption match the white-background caption better than the
    asked one, and the other way round, and those for a gray-background caption (not swapped) match gray better
    than black."""
    import numpy as np
    import torch

    from ncp.data.toy import toy_reward
    from ncp.generate import load_pipeline, render
    from ncp.toy_base import BASE_GUIDANCE, base_file, configured, write_base

    pipe = configured(load_pipeline(str(write_base(tmp_path / "base", base_file(arch))), "cpu"), arch)
    asked = ["a red square on a black background", "a yellow circle on a white background",
             "a purple square on a gray background"]
    with torch.no_grad():
        images = render(pipe, [p for p in asked for _ in range(4)], list(range(4)) * 3, 8, BASE_GUIDANCE, 32)

    def reward(i, caption):
        return np.mean([toy_reward(img, caption) for img in images[4 * i:4 * i + 4]])

    assert reward(0, "a red square on a white background") > reward(0, asked[0]) + 0.1
    assert reward(1, "a yellow circle on a black background") > reward(1, asked[1]) + 0.1
    assert reward(2, asked[2]) > reward(2, "a purple square on a black background") + 0.1
