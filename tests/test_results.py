"""Using the results: generation, reward evaluation, curves and the Hub card, on tiny offline models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncp.errors import NcpError

STEPS = 2  # denoising steps: enough to exercise the pipeline, cheap on CPU


# ---------------------------------------------------------------- fixtures
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
    from ncp.generate import generate, load_prompts

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
    generate(str(tiny_pipe_dir), [str(lora_run)], prompts, again, seeds=[0, 1], batch_size=3, steps=STEPS)
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
