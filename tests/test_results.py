"""Using the results: generation, reward evaluation, curves and the Hub card, on tiny offline models."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncp.errors import NcpError

STEPS = 2  # denoising steps: enough to exercise the pipeline, cheap on CPU


# ---------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest single-threaded (conftest)


@pytest.fixture(scope="module")
def tiny_pipe_dir(tmp_path_factory) -> Path:
    from ncp.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


def write_lora(pipe_dir: Path, out_dir: Path, seed: int) -> Path:
    """A diffusers-format LoRA for the tiny U-Net with random (non-zero) A and B, as training would leave it."""
    import peft
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipe_dir / "unet")
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=g))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def lora_run(tiny_pipe_dir, tmp_path_factory) -> Path:
    return write_lora(tiny_pipe_dir, tmp_path_factory.mktemp("runs") / "run-a", seed=1)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- generation
def test_generate_writes_images_and_index_reproducibly(tiny_pipe_dir, lora_run, tmp_path):
    from ncp.generate import generate, load_prompts, main as generate_main

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle\n\na blue square\n")
    prompts = load_prompts(str(prompt_file))
    assert prompts == ["a red circle", "a blue square"]  # blank lines dropped

    out = tmp_path / "gen"
    rows = generate(str(tiny_pipe_dir), [str(lora_run)], prompts, out, seeds=[0, 1], batch_size=3, steps=STEPS)
    expected = {f"{m}/{i}_{s}.png" for m in ("base", "run-a") for i in (0, 1) for s in (0, 1)}
    assert {r["path"] for r in rows} == expected
    assert {str(p.relative_to(out)) for p in out.rglob("*.png")} == expected
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert index == rows
    row = next(r for r in index if r["path"] == "run-a/1_0.png")
    assert (row["prompt"], row["prompt_idx"], row["seed"], row["model"]) == ("a blue square", 1, 0, "run-a")
    assert Image.open(out / row["path"]).size == (32, 32)

    # Same seeds and batch size -> identical images; another batch size only changes float rounding.
    again = tmp_path / "again"
    generate_main(["--model", str(tiny_pipe_dir), "--lora", str(lora_run), "--prompts", str(prompt_file),
                   "--out", str(again), "--seeds", "0", "1", "--batch-size", "3", "--steps", str(STEPS),
                   "--device", "cpu"])
    single = tmp_path / "single"
    generate(str(tiny_pipe_dir), [], prompts, single, seeds=[0, 1], batch_size=1, steps=STEPS)
    for rel in expected:
        assert np.array_equal(pixels(out / rel), pixels(again / rel)), rel
    for rel in (r for r in expected if r.startswith("base/")):
        assert np.abs(pixels(out / rel) - pixels(single / rel)).max() <= 2, rel
    # The LoRA changes images; seeds matter.
    assert np.abs(pixels(out / "base/0_0.png") - pixels(out / "run-a/0_0.png")).max() > 0
    assert np.abs(pixels(out / "base/0_0.png") - pixels(out / "base/0_1.png")).max() > 0


def test_prompt_sets_from_local_copies(tmp_path):
    import datasets

    from ncp.generate import load_prompts

    parti = tmp_path / "parti.parquet"
    datasets.Dataset.from_dict({"Prompt": [" a cat ", "a dog", "a cow"], "Category": ["x"] * 3}).to_parquet(str(parti))
    assert load_prompts("parti", str(parti), max_prompts=2) == ["a cat", "a dog"]

    pick = tmp_path / "pickapic"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"caption": ["train prompt"]}),
        "validation_unique": datasets.Dataset.from_dict({"caption": ["p1", "p2"]}),
    }).save_to_disk(str(pick))
    assert load_prompts("pickapic", str(pick)) == ["p1", "p2"]

    with pytest.raises(NcpError, match="Prompt"):
        load_prompts("parti", str(pick / "train"))  # no Prompt column there
    with pytest.raises(NcpError, match="nope.txt"):
        load_prompts(str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------- evaluation
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    """A randomly initialised CLIPModel and its processor (byte-level tokenizer from ncp.tiny), as local folders."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from ncp.tiny import write_tokenizer

    root = tmp_path_factory.mktemp("clip")
    write_tokenizer(root / "processor")
    tok = CLIPTokenizer.from_pretrained(root / "processor")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(root / "processor")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1, **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(root / "model")
    return root / "model", root / "processor"


def fake_index(root: Path, models=("base", "a", "b"), prompts=("a red circle", "a blue square"), seeds=(0, 1)):
    """Random images plus an index.jsonl in ncp.generate's layout."""
    rng = np.random.default_rng(0)
    rows = []
    for m in models:
        (root / m).mkdir(parents=True)
        for i, p in enumerate(prompts):
            for s in seeds:
                rel = f"{m}/{i}_{s}.png"
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / rel)
                rows.append(dict(prompt=p, prompt_idx=i, seed=s, model=m, lora=None, path=rel))
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_wilson_interval_and_ties_by_hand():
    from ncp.evaluate import win_rate, wilson_interval

    low, high = wilson_interval(8, 10)  # textbook: p = 0.8, n = 10 -> [0.4902, 0.9433]
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    # a beats b on key 1, ties on 2, loses on 3 -> (1 + 0.5) / 3
    w = win_rate({1: 2.0, 2: 1.0, 3: 0.0, 9: 5.0}, {1: 1.0, 2: 1.0, 3: 1.0})
    assert (w["wins"], w["ties"], w["n"]) == (1, 1, 3) and w["win_rate"] == pytest.approx(0.5)
    assert (w["low"], w["high"]) == pytest.approx(wilson_interval(1.5, 3))
    # two seeds per prompt are one trial: prompt 0 wins both, prompt 1 wins one and loses one -> 0.75 over 2 prompts
    a, b = {(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 0.0}, {(0, 0): 0.0, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 1.0}
    w = win_rate(a, b)
    assert (w["win_rate"], w["n"], w["prompts"]) == (0.75, 4, 2)
    assert (w["low"], w["high"]) == pytest.approx(wilson_interval(1.5, 2))


def test_win_rates_compare_the_same_images_and_lora_names_take_the_first_equals_sign(tmp_path):
    from ncp.evaluate import summarise
    from ncp.generate import resolve_lora

    rows = [dict(model=m, prompt_idx=i, seed=0, prompt=f"{p} {i}") for m, p in (("base", "cat"), ("lora", "dog"))
            for i in range(2)]
    with pytest.raises(NcpError, match=r"'lora' and the baseline 'base' do not have the same images: .*\(0, 0\)"):
        summarise(rows, {"toy": [0.0] * 4})
    same = [dict(r, prompt=f"cat {r['prompt_idx']}") for r in rows]
    assert summarise(same, {"toy": [0.0, 0.0, 1.0, 1.0]})["toy"]["win_rate"]["lora"]["win_rate"] == 1.0

    run = tmp_path / "out=1" / "run"  # a folder with '=' in its path, named NAME=PATH
    run.mkdir(parents=True)
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert resolve_lora(f"ncp={run}") == ("ncp", run)


def test_pickscore_evaluation_matches_direct_computation(tiny_clip, tmp_path, monkeypatch):
    from transformers import AutoProcessor, CLIPModel

    from ncp.evaluate import evaluate, wilson_interval

    model_dir, proc_dir = tiny_clip
    rows = fake_index(tmp_path / "gen")
    for optional in ("hpsv2", "ImageReward"):  # make the optional packages unimportable even where installed
        monkeypatch.setitem(sys.modules, optional, None)
    results = evaluate(tmp_path / "gen" / "index.jsonl", ["pickscore", "hpsv2", "imagereward"], tmp_path / "eval", batch_size=5,
                       pickscore_model=str(model_dir), pickscore_processor=str(proc_dir))

    # Direct: CLIP's own forward gives logits_per_image = logit_scale.exp() * cos; PickScore is its diagonal.
    model, proc = CLIPModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(proc_dir)
    images = [Image.open(tmp_path / "gen" / r["path"]).convert("RGB") for r in rows]
    inputs = proc(text=[r["prompt"] for r in rows], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        direct = model(**inputs).logits_per_image.diagonal().tolist()
    scores = {(r["model"], r["prompt_idx"], r["seed"]): s for r, s in zip(rows, direct)}
    assert len(set(round(s, 6) for s in direct)) > 1  # a constant scorer would make the checks below vacuous

    res = results["rewards"]["pickscore"]
    keys = [(i, s) for i in (0, 1) for s in (0, 1)]
    for m in ("base", "a", "b"):
        assert res["mean"][m] == pytest.approx(np.mean([scores[(m, *k)] for k in keys]), abs=1e-5)
    for m in ("a", "b"):
        wins = sum(scores[(m, *k)] > scores[("base", *k)] for k in keys)
        w = res["win_rate"][m]
        assert (w["wins"], w["n"]) == (wins, 4) and w["win_rate"] == pytest.approx(wins / 4)
        assert (w["low"], w["high"]) == pytest.approx(wilson_interval(wins / 4 * 2, 2))  # over the 2 prompts
    assert "base" not in res["win_rate"]

    # Missing optional reward: reported in the JSON and the table, not a crash.
    assert set(results["skipped"]) == {"hpsv2", "imagereward"} and set(results["rewards"]) == {"pickscore"}
    assert "hpsv2 is not importable" in results["skipped"]["hpsv2"]
    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert on_disk["rewards"]["pickscore"]["mean"] == pytest.approx(res["mean"])
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "| a |" in md and f"{res['mean']['a']:.4f}" in md and "Skipped hpsv2" in md and "Wilson" in md
    per_image = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert [p["pickscore"] for p in per_image] == pytest.approx(direct, abs=1e-5)


def test_toy_reward_and_bad_index(tmp_path):
    from ncp.data.toy import render, toy_reward
    from ncp.evaluate import evaluate, main as evaluate_main

    root = tmp_path / "gen"
    rows = fake_index(root, models=("base", "good"), prompts=("a red circle on a white background",), seeds=(0,))
    render("red", "circle", "white").save(root / "good/0_0.png")  # perfect image for its caption
    evaluate_main(["--index", str(root / "index.jsonl"), "--reward", "toy", "--out", str(tmp_path / "eval")])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    base_score = toy_reward(Image.open(root / rows[0]["path"]).convert("RGB"), rows[0]["prompt"])
    assert results["rewards"]["toy"]["mean"] == pytest.approx({"base": base_score, "good": 1.0})
    assert results["rewards"]["toy"]["win_rate"]["good"]["win_rate"] == 1.0

    with pytest.raises(NcpError, match="--baseline 'sd15'.*'good'"):
        evaluate(root / "index.jsonl", ["toy"], tmp_path / "eval", baseline="sd15")
    (root / "index.jsonl").write_text('{"prompt": "x", "seed": 0, "model": "base", "path": "p.png"}\n')
    with pytest.raises(NcpError, match=r"index.jsonl, line 1: missing key\(s\) \['prompt_idx'\]"):
        evaluate(root / "index.jsonl", ["toy"], tmp_path / "eval")


# ---------------------------------------------------------------- curves
def test_curves_over_checkpoints(tiny_pipe_dir, tmp_path):
    import shutil

    from ncp.curves import main as curves_main, run_loras
    from ncp.data.toy import toy_reward
    from ncp.generate import generate

    run = tmp_path / "run-x"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7}) + "\n" for s in range(1, 6)))
    write_lora(tiny_pipe_dir, run / "checkpoints" / "checkpoint-00000002", seed=2)
    write_lora(tiny_pipe_dir, run / "checkpoints" / "checkpoint-00000004", seed=4)
    shutil.copy(run / "checkpoints/checkpoint-00000004/pytorch_lora_weights.safetensors", run)  # final LoRA
    assert [(s, p.name) for s, p in run_loras(run)] == [(2, "checkpoint-00000002"), (4, "checkpoint-00000004"),
                                                       (5, "run-x")]  # final step = last step in metrics.jsonl

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a white background\na blue square on a black background\nunused\n")
    out = tmp_path / "curves"
    curves_main(["--run", str(run), "--model", str(tiny_pipe_dir), "--prompts", str(prompts), "--max-prompts", "2",
                 "--seeds", "0", "--steps", str(STEPS), "--reward", "toy", "--device", "cpu", "--out", str(out)])

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = json.loads((out / "curves.json").read_text())["runs"]["run-x"]
    assert [p["step"] for p in points] == [0, 2, 4, 5]
    with open(out / "curves.csv") as f:
        csv_rows = f.read().splitlines()
    assert csv_rows[0] == "run,step,reward,lora" and len(csv_rows) == 5

    # Direct: render with ncp.generate and score with toy_reward by hand, for the base and checkpoint 2.
    gen = generate(str(tiny_pipe_dir), [str(run / "checkpoints" / "checkpoint-00000002")],
                   prompts.read_text().splitlines()[:2], tmp_path / "gen", seeds=[0], batch_size=8, steps=STEPS)
    direct = {}
    for r in gen:
        direct.setdefault(r["model"], []).append(toy_reward(Image.open(tmp_path / "gen" / r["path"]), r["prompt"]))
    assert points[0]["reward"] == pytest.approx(np.mean(direct["base"]), abs=1e-4)
    assert points[1]["reward"] == pytest.approx(np.mean(direct["run-x-checkpoint-00000002"]), abs=1e-4)
    assert points[1]["reward"] != points[2]["reward"]  # different checkpoints, different scores
    assert points[2]["reward"] == pytest.approx(points[3]["reward"])  # final LoRA = checkpoint 4's weights

    with pytest.raises(NcpError, match="no pytorch_lora_weights"):
        run_loras(tmp_path / "gen")

    # stopped at its third point, the same command scores only the points it lacks and gives the same curve
    import ncp.curves

    real, calls = ncp.curves.score_lora, []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*a, **k)

    again = tmp_path / "again"
    argv = ["--run", str(run), "--model", str(tiny_pipe_dir), "--prompts", str(prompts), "--max-prompts", "2",
            "--seeds", "0", "--steps", str(STEPS), "--reward", "toy", "--device", "cpu", "--out", str(again)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ncp.curves, "score_lora", stop_at_third)
        with pytest.raises(RuntimeError, match="killed"):
            curves_main(argv)
        calls.append("resumed")
        curves_main(argv)
    assert calls.count(1) == 5  # base and checkpoint 2, then checkpoint 4 and the final LoRA (its own file)
    assert json.loads((again / "curves.json").read_text())["runs"] == json.loads((out / "curves.json").read_text())["runs"]
    assert not (again / "curves.partial.jsonl").exists()


# ---------------------------------------------------------------- hub
def fake_finished_run(root: Path) -> Path:
    """A run folder as training leaves it: config.yaml, metrics.jsonl, final LoRA, two validation grids."""
    import yaml
    from safetensors.torch import save_file

    run = root / "ncp-dpo-run"
    (run / "validation").mkdir(parents=True)
    config = {
        "model": {"pretrained": "stable-diffusion-v1-5/stable-diffusion-v1-5", "arch": "sd15", "vae": None},
        "objective": {"loss": "dpo", "space": "perceptual", "beta": 2500.0, "cpo_lambda": 0.0},
        "lora": {"rank": 64, "alpha": None},
        "optim": {"lr": 1.25e-7, "optimizer": "adamw8bit"},
        "train": {"batch_size": 4, "grad_accum": 8, "max_steps": 20, "output_dir": str(run),
                  "validation_prompts": ["a red circle on a white background"]},
        "data": {"source": "hub", "path": "liuhuohuo2/pick-a-pic-v2", "split": "train", "max_pairs": None},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": s, "loss": 0.69 - 0.01 * s, "implicit_acc": 0.5 + 0.01 * s, "reward_w": 0.1 * s,
             "reward_l": -0.1 * s, "lr": 1.25e-7} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_file({"unet.x.lora_A.weight": torch.ones(2, 2)}, str(run / "pytorch_lora_weights.safetensors"))
    Image.new("RGB", (64, 32), (255, 0, 0)).save(run / "validation" / "step-00000010.png")
    Image.new("RGB", (64, 32), (0, 0, 255)).save(run / "validation" / "step-00000020.png")
    return run


def test_model_card_and_upload_folder(tmp_path):
    from ncp.hub import build_model_card, prepare_upload_folder

    run = fake_finished_run(tmp_path)
    card = build_model_card(run, repo_id="me/sd15-ncp-dpo")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.datasets == ["liuhuohuo2/pick-a-pic-v2"] and card.data.library_name == "diffusers"
    assert {"lora", "ncp-dpo", "stable-diffusion"} <= set(card.data.tags)
    assert card.data.license is None  # not in the config: left to the user
    text = str(card)
    for needed in ("NCP-DPO", "| loss space | perceptual |", "| objective.beta | 2500 |", "| lora.rank | 64 |",
                   "| optim.lr | 1.25e-07 |", "| train.grad_accum | 8 |", "| path | liuhuohuo2/pick-a-pic-v2 |",
                   "Last logged optimizer step (20)", "| implicit_acc | 0.7 |", "| loss | 0.49 |",
                   'pipe.load_lora_weights("me/sd15-ncp-dpo")', "StableDiffusionPipeline.from_pretrained(",
                   "![validation samples](sample_grid.png)", "at step 20"):
        assert needed in text, needed
    assert "output_dir" not in text
    assert 'pipe("a red circle on a white background", num_inference_steps=25)' in text  # the pipeline's guidance
    assert "following *Aligning Diffusion Models with Noise-Conditioned Perception*" in text and "Wallace" not in text
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"].update(guidance=3.5, max_sequence_length=256)  # a FLUX.1 run's embedded guidance and T5 length
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    config["objective"]["space"] = "latent"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = str(build_model_card(run))
    assert "num_inference_steps=25, guidance_scale=3.5, max_sequence_length=256)" in card
    assert "**Diffusion-DPO** (latent space),\nthe latent-space objective (*Diffusion Model Alignment" in card

    folder = prepare_upload_folder(run, tmp_path / "upload", "me/sd15-ncp-dpo", license="openrail++")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors",
                                                       "sample_grid.png"]
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == \
        (run / "pytorch_lora_weights.safetensors").read_bytes()
    assert Image.open(folder / "sample_grid.png").getpixel((0, 0)) == (0, 0, 255)  # the latest grid (step 20)
    assert "license: openrail++" in (folder / "README.md").read_text()
    with pytest.raises(NcpError, match="not empty"):
        prepare_upload_folder(run, folder)


def test_push_to_hub_uploads_the_folder_and_never_writes_the_token(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from ncp.hub import main as hub_main, push_to_hub

    run = fake_finished_run(tmp_path)
    calls = []

    def fake_create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw.get("private"), self.token))

    def fake_upload_folder(self, *, repo_id, folder_path, **kw):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        calls.append(("upload", repo_id, files, self.token))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    secret = "hf_SECRETtoken1234567890"
    url = push_to_hub(run, "me/sd15-ncp-dpo", private=True, token=secret)
    assert url == "https://huggingface.co/me/sd15-ncp-dpo/commit/abc"
    assert calls[0] == ("create", "me/sd15-ncp-dpo", True, secret)
    _, repo, files, token = calls[1]
    assert (repo, token) == ("me/sd15-ncp-dpo", secret)
    assert sorted(files) == ["README.md", "pytorch_lora_weights.safetensors", "sample_grid.png"]
    assert 'load_lora_weights("me/sd15-ncp-dpo")' in files["README.md"].decode()

    # CLI with the token from the environment: used, never printed, never written anywhere.
    env_secret = "hf_ENVtoken0987654321"
    monkeypatch.setenv("HF_TOKEN", env_secret)
    hub_main(["--run", str(run), "--repo-id", "me/other"])
    out = capsys.readouterr()
    assert "me/other/commit/abc" in out.out and env_secret not in out.out + out.err
    uploaded = calls[-1][2]
    for data in [*files.values(), *uploaded.values()]:
        assert secret.encode() not in data and env_secret.encode() not in data
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes() and env_secret.encode() not in path.read_bytes(), path
    with pytest.raises(NcpError, match="USER/NAME"):
        push_to_hub(run, "not a repo id")


def test_generate_continues_where_it_stopped_and_adds_models_to_the_index(tiny_pipe_dir, lora_run, tmp_path,
                                                                           monkeypatch):
    """A crash in the third batch keeps the images of the first two; the same call renders only the rest, and the
    index equals an uninterrupted run's. A LoRA rendered later into the folder joins the base's rows; other
    settings are refused."""
    import ncp.generate as gen

    prompts = ["a red circle", "a blue square", "a green triangle"]
    straight = gen.generate(str(tiny_pipe_dir), [str(lora_run)], prompts, tmp_path / "straight", seeds=[0, 1],
                            batch_size=2, steps=STEPS)
    real, calls, crash = gen.render, [], [3]

    def crash_at_third(*a, **k):
        calls.append(1)
        if len(calls) in crash:
            raise RuntimeError("killed")
        return real(*a, **k)

    out = tmp_path / "gen"
    monkeypatch.setattr(gen, "render", crash_at_third)
    with pytest.raises(RuntimeError, match="killed"):
        gen.generate(str(tiny_pipe_dir), [str(lora_run)], prompts, out, seeds=[0, 1], batch_size=2, steps=STEPS)
    assert not (out / "index.jsonl").exists() and len((out / "index.partial.jsonl").read_text().splitlines()) == 4
    calls.clear()
    crash.clear()
    rows = gen.generate(str(tiny_pipe_dir), [str(lora_run)], prompts, out, seeds=[0, 1], batch_size=2, steps=STEPS)
    assert len(calls) == 4  # base's last batch, the LoRA's three: 8 of 12 images
    assert rows == straight and not (out / "index.partial.jsonl").exists()
    for r in rows:
        assert np.array_equal(pixels(out / r["path"]), pixels(tmp_path / "straight" / r["path"])), r["path"]
    lora_file = lora_run / "pytorch_lora_weights.safetensors"  # retrained (a new file time): its images again
    os.utime(lora_file, ns=(lora_file.stat().st_atime_ns, lora_file.stat().st_mtime_ns + 1))
    calls.clear()
    gen.generate(str(tiny_pipe_dir), [str(lora_run)], prompts, out, seeds=[0, 1], batch_size=2, steps=STEPS)
    assert len(calls) == 3  # the LoRA's three batches, not the base's

    base_only = tmp_path / "base-first"
    gen.generate(str(tiny_pipe_dir), [], prompts, base_only, seeds=[0], steps=STEPS)
    calls.clear()
    gen.generate(str(tiny_pipe_dir), [str(lora_run)], prompts, base_only, seeds=[0], steps=STEPS, include_base=False)
    index = [json.loads(line) for line in (base_only / "index.jsonl").read_text().splitlines()]
    assert [r["model"] for r in index] == ["base"] * 3 + ["run-a"] * 3 and len(calls) == 1
    with pytest.raises(NcpError, match="holds images rendered with other settings"):
        gen.generate(str(tiny_pipe_dir), [], prompts, base_only, seeds=[0], steps=STEPS + 1)
    legacy = tmp_path / "legacy"  # an index from before settings were recorded: everything is rendered again
    legacy.mkdir()
    (legacy / "index.jsonl").write_text(json.dumps(dict(straight[0], model="old")) + "\n")
    assert len(gen.generate(str(tiny_pipe_dir), [], prompts[:1], legacy, seeds=[0], steps=STEPS)) == 1
    assert [json.loads(line)["model"] for line in (legacy / "index.jsonl").read_text().splitlines()] == ["base"]


def test_evaluation_continues_where_it_stopped(tmp_path):
    """A reward that fails halfway keeps the batches scored so far; the rerun scores only the rest and gives what an
    uninterrupted run gives. A missing image is named with its index line before any scoring."""
    from ncp.evaluate import evaluate

    rows = fake_index(tmp_path / "gen")
    calls = []

    def scorer(images, prompts):
        calls.append(len(images))
        if len(calls) == 3 and fail:
            raise RuntimeError("killed")
        return [float(np.asarray(im).mean()) for im in images]

    fail = False
    straight = evaluate(tmp_path / "gen" / "index.jsonl", ["toy"], tmp_path / "straight", batch_size=2,
                        scorers={"toy": scorer})
    calls.clear()
    fail = True
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(tmp_path / "gen" / "index.jsonl", ["toy"], tmp_path / "eval", batch_size=2, scorers={"toy": scorer})
    assert len((tmp_path / "eval" / "scores-toy.partial.jsonl").read_text().splitlines()) == 4
    calls.clear()
    fail = False
    again = evaluate(tmp_path / "gen" / "index.jsonl", ["toy"], tmp_path / "eval", batch_size=2, scorers={"toy": scorer})
    assert sum(calls) == len(rows) - 4 and again["rewards"] == straight["rewards"]
    assert not (tmp_path / "eval" / "scores-toy.partial.jsonl").exists()

    (tmp_path / "gen" / rows[1]["path"]).unlink()
    with pytest.raises(NcpError, match=r"index.jsonl, line 2: no image .*" + rows[1]["path"]):
        evaluate(tmp_path / "gen" / "index.jsonl", ["toy"], tmp_path / "missing", scorers={"toy": scorer})


def test_hpsv2_loads_its_checkpoint_once_and_scores_in_batches(tmp_path, monkeypatch):
    """The hpsv2 package's model and checkpoint (stood in for here: the package is not installed) are loaded once;
    each image's score is cos(its features, its prompt's features), whatever the batch."""
    import types

    import huggingface_hub
    import torch.nn.functional as F

    from ncp.evaluate import make_scorer

    loads = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = torch.nn.Linear(12, 4), torch.nn.Embedding(50, 4)

        def forward(self, pixels, tokens):
            return {"image_features": F.normalize(self.image(pixels.flatten(1)), dim=-1),
                    "text_features": F.normalize(self.text(tokens).mean(1), dim=-1)}

    model = Model()
    torch.save({"state_dict": {k: torch.randn_like(v) for k, v in model.state_dict().items()}}, tmp_path / "hps.pt")
    model_dict = {}
    img_score = types.SimpleNamespace(model_dict=model_dict, initialize_model=lambda: model_dict.update(
        model=model, preprocess_val=lambda im: torch.tensor(np.asarray(im.resize((2, 2))), dtype=torch.float32).flatten()))
    tokenizer = lambda texts: torch.tensor([[len(w) for w in t.split()][:3] + [0] * (3 - len(t.split()[:3])) for t in texts])  # noqa: E731
    for name, module in {"hpsv2": types.SimpleNamespace(), "hpsv2.img_score": img_score,
                         "hpsv2.src.open_clip": types.SimpleNamespace(get_tokenizer=lambda arch: tokenizer),
                         "hpsv2.utils": types.SimpleNamespace(hps_version_map={"v2.1": "HPS_v2.1_compressed.pt"})}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, file: loads.append((repo, file)) or str(tmp_path / "hps.pt"))
    scorer = make_scorer("hpsv2")
    images = [Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)) for i in range(4)]
    prompts = ["a red circle", "a blue square on black", "cat", "a dog"]
    together = scorer(images, prompts)
    alone = [scorer([im], [p])[0] for im, p in zip(images, prompts)]
    assert loads == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")]
    saved = torch.load(tmp_path / "hps.pt")["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # the checkpoint's weights score
    assert together == pytest.approx(alone, abs=1e-6) and len(set(round(s, 5) for s in together)) == 4
    with torch.no_grad():
        out = model(torch.stack([model_dict["preprocess_val"](im) for im in images]), tokenizer(prompts))
    assert together == pytest.approx((out["image_features"] * out["text_features"]).sum(-1).tolist(), abs=1e-6)
