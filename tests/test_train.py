"""The training scripts through their command lines on the tiny SD1.5 / SDXL folders."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ncp.config import load_config
from ncp.errors import NcpError
from ncp.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def args(model, out, *extra, config="configs/tiny_sd15_ncp_dpo.yaml"):
    return ["--config", str(ROOT / config), f"model.pretrained={model}", f"train.output_dir={out}",
            "train.batch_size=2", "data.toy_num_pairs=16", "train.validation_steps=2", "lora.rank=4", *extra]


def run_script(loss, argv):
    """`python train_ncp_<loss>.py ARGV`, in this process."""
    return importlib.import_module(f"train_ncp_{loss}").main(argv)


def metrics(out):
    return read_metrics(out)


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each in-process run starts like a new process: scripts importable, accelerate's singleton state cleared
    (it would otherwise keep the first run's mixed precision)."""
    from accelerate.state import AcceleratorState

    monkeypatch.syspath_prepend(str(ROOT))
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("arch,loss", [("sd15", "dpo"), ("sd15", "cpo"), ("sd15", "sft"),
                                       ("sdxl", "dpo"), ("sdxl", "cpo"), ("sdxl", "sft")])
def test_script_trains_lora_only(tiny_paths, tmp_path, arch, loss):
    from accelerate.utils import set_seed

    from ncp.models import add_lora, load_models

    out = tmp_path / "run"
    run = run_script(loss, args(tiny_paths[arch], out, "train.max_steps=3", "optim.optimizer=adamw"))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    fresh = load_models(str(tiny_paths[arch]))
    set_seed(0)
    add_lora(fresh.unet, rank=4)  # the same seeded initialisation the trainer started from
    before = dict(fresh.unet.named_parameters())
    after = dict(run.parts.models.unet.named_parameters())
    lora = [n for n in after if "lora" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora)
    assert all(torch.equal(before[n], p) for n, p in after.items() if "lora" not in n)
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert load_config(str(out / "config.yaml")).model.arch == arch  # resolved: written after detection
    assert list((out / "validation").glob("step-*.png"))


def test_resume_gives_the_same_losses_and_lora(tiny_sd15, tmp_path, monkeypatch):
    import ncp.objective
    import ncp.train

    common = ["train.max_steps=6", "train.checkpoint_every=2", "train.grad_accum=2", "objective.beta=50000"]
    straight = tmp_path / "straight"
    run_script("dpo", args(tiny_sd15, straight, *common))

    crashed = tmp_path / "crashed"
    real, calls = ncp.objective.compute_objective, []

    def crash_at_step_5(*a, **kw):  # 2 micro-steps per optimizer step: call 9 is step 5
        calls.append(1)
        if len(calls) == 9:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(ncp.train, "compute_objective", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_script("dpo", args(tiny_sd15, crashed, *common))
    monkeypatch.setattr(ncp.train, "compute_objective", real)
    assert [r["step"] for r in metrics(crashed)] == [1, 2, 3, 4]
    run_script("dpo", args(tiny_sd15, crashed, *common, "train.resume_from=latest"))

    a, b = metrics(straight), metrics(crashed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert len({r["loss"] for r in a}) > 1  # the losses move, so equality means something
    la, lb = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (straight, crashed))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(tiny_sd15, tmp_path, monkeypatch):
    import ncp.objective
    import ncp.train

    real, calls = ncp.objective.compute_objective, []

    def nan_on(steps):
        def fn(*a, **kw):
            calls.append(1)
            loss, m = real(*a, **kw)
            return (loss * float("nan"), m) if len(calls) in steps else (loss, m)
        return fn

    out = tmp_path / "nan"
    monkeypatch.setattr(ncp.train, "compute_objective", nan_on({2}))
    run_script("dpo", args(tiny_sd15, out, "train.max_steps=3"))
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]

    calls.clear()
    out = tmp_path / "nan_stop"
    monkeypatch.setattr(ncp.train, "compute_objective", nan_on({2, 3, 4}))
    with pytest.raises(NcpError, match="3 non-finite steps in a row"):
        run_script("dpo", args(tiny_sd15, out, "train.max_steps=10", "train.max_bad_steps=3"))
    assert (out / "checkpoints" / "checkpoint-00000004" / "ncp_state.json").exists()


def test_lora_loads_into_pipeline_and_unloads(tiny_sd15, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    import ncp.hub

    pushed = []
    monkeypatch.setattr(ncp.hub, "push_to_hub", lambda *a, **kw: pushed.append((a, kw)) or "url")
    out = tmp_path / "run"
    run_script("dpo", args(tiny_sd15, out, "train.max_steps=2", "optim.lr=0.01", "train.validation_reward=toy",
                           "hub.repo_id=me/tiny-ncp"))
    assert pushed == [((str(out), "me/tiny-ncp", False), {"license": None})]
    rewards = [json.loads(line) for line in (out / "validation" / "rewards.jsonl").read_text().splitlines()]
    assert rewards[-1]["step"] == 2 and 0.0 <= rewards[-1]["mean"] <= 1.0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)

    def image():
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    base = image()
    pipe.load_lora_weights(out)
    tuned = image()
    pipe.unload_lora_weights()
    assert not (base == tuned).all()
    assert (image() == base).all()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path):
    loss = path.stem.split("_")[-1]
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch") and f"train_ncp_{loss}.py --config configs/{path.name}" in first
    cfg = load_config(str(path), **{"objective.loss": loss})
    assert cfg.objective.loss == loss


def test_encoder_error_auto_is_the_measured_choice_for_the_precision():
    """benchmarks/RESULTS.md section 3: fp32 -> difference, fp16 and bf16 -> linearized; a re-noised
    target has no small step to linearize, so half precision falls back to f in fp32 there."""
    from ncp.config import AUTO_ERROR

    assert AUTO_ERROR == {"no": "difference", "fp16": "linearized", "bf16": "linearized"}
    for mp, mode in AUTO_ERROR.items():
        assert load_config(None, [f"train.mixed_precision={mp}"]).encoder.error == mode
    assert load_config(None, ["train.mixed_precision=fp16", "objective.target=uniform"]).encoder.error == "fp32"
    assert load_config(None, ["train.mixed_precision=fp16", "encoder.error=fp32"]).encoder.error == "fp32"
    with pytest.warns(UserWarning, match="encoder.error=difference with train.mixed_precision=bf16"):
        load_config(None, ["train.mixed_precision=bf16", "encoder.error=difference"])
    for path in sorted((ROOT / "configs").glob("s*_ncp_*.yaml")):  # the paper configs take the measured choice
        assert load_config(str(path)).encoder.error == "linearized", path.name


def test_validation_without_t5_beside_a_cache_with_it_is_named():
    keys = ["data.cache_dir=cache", "model.text_encoder_3=false", "train.validation_prompts=[a cat]"]
    with pytest.warns(UserWarning, match="model.text_encoder_3=false with data.cache_dir: .*validation renders without T5"):
        load_config(None, keys)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, keys[:2] + ["train.validation_prompts=[]"])  # no validation: nothing to tell


def test_bad_keys_and_types_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stpes: 3\n")
    with pytest.raises(NcpError, match="train.max_stpes"):
        load_config(str(bad))
    with pytest.raises(NcpError, match="train.batch_size must be of type int"):
        load_config(None, ["train.batch_size=two"])
    with pytest.raises(NcpError, match="objective.space"):
        load_config(None, ["objective.space=pixels"])
    with pytest.raises(NcpError, match="objective.loss"):
        load_config(None, ["objective.loss=cpo"], **{"objective.loss": "dpo"})
    assert load_config(None, ["optim.lr=1e-6"]).optim.lr == 1e-6  # YAML 1.1 reads 1e-6 as a string
    # YAML 1.1 reads no / off as false; the documented train.mixed_precision=no must stay a string
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  mixed_precision: no\n  gradient_checkpointing: true\n")
    cfg = load_config(str(good))
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is True
    with pytest.raises(NcpError, match="train.gradient_checkpointing must be of type bool"):
        load_config(None, ["train.gradient_checkpointing=yes"])
    with pytest.raises(NcpError, match="encoder.error must be one of"):
        load_config(None, ["encoder.error=exact"])
    with pytest.raises(NcpError, match="encoder.error=linearized needs objective.target=prev"):
        load_config(None, ["encoder.error=linearized", "objective.target=uniform"])


def test_two_processes_train_one_lora_and_resume_exactly(tiny_sd15, tmp_path):
    """Two gloo processes: one LoRA, and a run stopped at step 2 and resumed to 3 equals a straight 3-step run
    (each process restores its own RNG and noise generator)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}

    def launch(out, *extra):
        # the shipped 8-GPU DDP file, adapted to 2 CPU processes (ACCELERATE_USE_CPU=1: gloo)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "8gpu.yaml"), "--num_processes", "2", "--mixed_precision", "no",
               str(ROOT / "train_ncp_dpo.py"), *args(tiny_sd15, out, "objective.beta=50000", *extra)]
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    assert "effective batch 4" in launch(tmp_path / "straight", "train.max_steps=3")  # 2 processes x 2 pairs
    launch(tmp_path / "ddp", "train.max_steps=2")
    assert [r["step"] for r in metrics(tmp_path / "ddp")] == [1, 2]
    assert len(list((tmp_path / "ddp").glob("*.safetensors"))) == 1
    ckpt = tmp_path / "ddp" / "checkpoints" / "checkpoint-00000002"
    assert {p.name for p in ckpt.glob("generator_*")} == {"generator_0.safetensors", "generator_1.safetensors"}
    assert "resumed from" in launch(tmp_path / "ddp", "train.max_steps=3", "train.resume_from=latest")
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "ddp")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len({r["loss"] for r in a}) > 1
    la, lb = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (tmp_path / "straight", tmp_path / "ddp"))
    assert all(torch.equal(la[k], lb[k]) for k in la)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_training_from_the_latent_cache_matches_pixels(tiny_paths, tmp_path, arch):
    """The cache holds what encode() computes from pixels, so the first loss is the same either way."""
    from ncp.data.cache import main as build_cache

    cache = tmp_path / "cache"
    build_cache(["--model", str(tiny_paths[arch]), "--out", str(cache), "--toy-num-pairs", "16"])
    common = ["train.max_steps=2", "optim.optimizer=adamw"]
    run_script("dpo", args(tiny_paths[arch], tmp_path / "pixels", *common))
    run = run_script("dpo", args(tiny_paths[arch], tmp_path / "cached", *common, f"data.cache_dir={cache}"))
    a, b = metrics(tmp_path / "pixels"), metrics(tmp_path / "cached")
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    # from the cache the VAE and text encoders are freed for training, and loaded again for validation images
    assert run.parts.models.vae is None and run.parts.models.text_encoders == []
    import numpy as np
    from PIL import Image

    grids = [np.asarray(Image.open(next((tmp_path / d / "validation").glob("step-*.png"))), dtype=np.float64)
             for d in ("pixels", "cached")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).mean() < 1.0  # same images (LoRAs ~1e-5 apart)
    assert a[0]["err_w"] == pytest.approx(b[0]["err_w"], rel=1e-4)
    with pytest.raises(NcpError, match="stale cache"):
        other = "sdxl" if arch == "sd15" else "sd15"
        run_script("dpo", args(tiny_paths[other], tmp_path / "wrong", *common, f"data.cache_dir={cache}"))


@pytest.mark.parametrize("error", ["difference", "linearized", "fp32"])
def test_bf16_mixed_precision_starts_at_log2(tiny_sdxl, tmp_path, error):
    """Frozen weights in bf16, LoRA in fp32; policy = reference at step 1 in any precision."""
    out = tmp_path / "bf16"
    run = run_script("dpo", args(tiny_sdxl, out, "train.max_steps=2", "train.mixed_precision=bf16",
                                     f"encoder.error={error}", config="configs/tiny_sdxl_ncp_dpo.yaml"))
    rows = metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(rows[1]["loss"])
    assert run.parts.models.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in run.parts.params)
    assert run.parts.encoder.dtype == (torch.float32 if error == "fp32" else torch.bfloat16)


def test_adamw8bit_falls_back_when_bitsandbytes_fails_at_its_first_step(monkeypatch):
    """A bitsandbytes build without a library for the device builds AdamW8bit and fails at its first step: the
    probe step finds that before training starts, and the run falls back to torch's AdamW with a warning."""
    import warnings

    bnb = pytest.importorskip("bitsandbytes")
    from ncp.train import adamw8bit

    params = [torch.nn.Parameter(torch.zeros(8))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(adamw8bit(params, lr=1e-3), bnb.optim.AdamW8bit)

    def no_library(self, *a, **k):
        raise RuntimeError("libbitsandbytes_cuda999.so: cannot open shared object file")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", no_library)
    with pytest.warns(UserWarning, match="AdamW8bit unavailable .*cuda999.*falling back to torch.optim.AdamW"):
        optimizer = adamw8bit(params, lr=1e-3)
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["lr"] == 1e-3



@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_a_lora_with_alpha_other_than_its_rank_loads_at_its_trained_strength(tmp_path, arch):
    """lora.alpha = 4 x rank scales the update by 4 in training; the saved file carries the adapter's config, so
    diffusers' load_lora_weights applies it at 4 too (it assumes alpha = rank when the file does not say)."""
    from diffusers import DiffusionPipeline

    from ncp.models import add_lora, load_models, save_lora
    from ncp.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path / arch, arch)
    denoiser = load_models(str(path)).denoiser
    add_lora(denoiser, rank=2, alpha=8, init=False)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_lora(denoiser, tmp_path / "lora", arch)
    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = getattr(pipe, "unet", None) or pipe.transformer
    scales = {m.scaling[k] for m in loaded.modules() if hasattr(m, "scaling") for k in m.scaling}
    assert scales == {4.0}
