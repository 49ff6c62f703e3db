"""The training loop shared by train_ncp_dpo.py, train_ncp_cpo.py and train_ncp_sft.py.

`train(cfg)` is Algorithm 1 of the paper: build the data, the models and the optimizer, then a loop whose body
shows one micro-step (lines 4-18: batch, randomness, objective) and the cadence of optimizer steps, logs,
checkpoints and validation grids. The objective is `ncp.objective.compute_objective`; the run's bookkeeping
(folder, resume, step policy, stop signals) is `ncp.run.Run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from .conditioning import build_cond, to_device
from .config import Config, check_paths, describe_keys, load_config
from .errors import NcpError
from . import hostmem
from .fast import apply_fast_path, attention_backend
from .models import Models, add_lora, load_models
from .objective import compute_objective, randomness_for
from .run import Run

log = logging.getLogger("ncp")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(cfg: Config, resume_command: str | None = None) -> Run:
    """Algorithm 1 (errata applied); the loss and its space come from cfg.objective."""
    tc = cfg.train
    check_paths(cfg)                                  # missing model or data files: one line, before the folder guard
    acc = make_accelerator(tc)
    if acc.device.type == "cpu" and hostmem.applied:
        log.info("CPU training: freed memory stays with the process for the next step (ncp/hostmem.py)")
    if acc.device.type == "cpu" and os.environ.get("NCP_FLUSH_SUBNORMALS") != "0" and torch.set_flush_denormal(True):
        # a saturated DPO pair's loss gradient is subnormal (below 1.2e-38), and so is everything backward computes
        # from it: the CPU's slow path for subnormals made the quickstart's backward 3x slower (benchmarks/RESULTS.md
        # section 5). Flushed to zero, they change a step by less than fp32 rounding. NCP_FLUSH_SUBNORMALS=0: IEEE.
        log.info("CPU training: subnormal floats flush to zero")
    run = Run.open(cfg, acc, resume_command)         # folder guard, resume point, fingerprint: before minutes of loading
    loader = build_data(cfg, acc)                     # data first: a bad file fails before the models load
    max_steps = run.set_length(loader.sampler.batches_per_epoch)
    parts = build_models(cfg, acc)                    # 1-2: policy = base + LoRA, reference = LoRA off, f = frozen down path
    parts.schedule = parts.schedule.to(acc.device)   # the process's tables on the device: no host copy per micro-step
    optimizer, lr_scheduler = build_optimizer(cfg, parts, acc, max_steps)
    parts.unet, optimizer, lr_scheduler = acc.prepare(parts.models.unet, optimizer, lr_scheduler)
    generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + 7919 * acc.process_index + 1)  # t, eps, z per process
    run.start(parts, optimizer, lr_scheduler, generator)  # restores a checkpoint, or writes the resolved config
    if tc.validation_reward and acc.is_main_process:
        validation_scorer(cfg, acc)                   # a reward model's download or load happens now, not mid-run
    with run.stop_on_signals(), attention_backend(tc.attention, acc.device, DTYPES[tc.mixed_precision]), \
            logging_redirect_tqdm():                  # log lines above the progress bar, not inside it
        for batch in run.batches(loader):             # 3-4: repeat; (x0_w, x0_l, c) ~ D
            x0, cond = encode(parts, batch, cfg.data.resolution)
            rnd = randomness_for(cfg.objective, parts.schedule, x0.shape[0] // 2, x0.shape[1:],
                                 generator).to(x0.device)  # 5, 7, 10: t, eps, z per pair
            with acc.accumulate(parts.unet):
                with acc.autocast():                  # 6, 8-18: x_t, reverse steps to t-1, errors in f's space, loss
                    loss, metrics = compute_objective(parts.unet, parts.encoder, parts.schedule, x0, cond, rnd,
                                                      cfg.objective)
                acc.backward(loss)
            run.track(loss, metrics)
            if not acc.sync_gradients:
                run.stop_within_step()                # a stop signal: checkpoint the accumulation so far, end the loop
                continue
            if not run.step_optimizer():              # 19: clip, step; NaN and GradScaler policy
                continue                              # the fp16 GradScaler skipped it: not a step, take the next batch
            run.log()
            if run.due(tc.checkpoint_every):
                run.checkpoint()
            if run.due(tc.validate_every) or run.step == run.max_steps:
                render_validation_grid(cfg, acc, parts, run.step)
    run.finish()                                      # final checkpoint and LoRA; resume hint after a stop signal
    return run


# -- building the parts ----------------------------------------------------------------------------------------
def make_accelerator(tc):
    """Processes, devices, mixed precision, gradient accumulation and trackers."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    out = Path(tc.output_dir)
    acc = Accelerator(
        gradient_accumulation_steps=tc.grad_accum, mixed_precision=tc.mixed_precision,
        log_with=None if tc.report_to == "none" else tc.report_to,
        step_scheduler_with_optimizer=False,  # Run steps the schedule itself, once per applied update
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # the others wait at a barrier while the first process renders (and scores) the validation images:
        # NCCL's and gloo's 600 s default would end the job on a slow validation
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=tc.process_timeout_s))],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")  # libraries' loggers stay at WARNING
    log.setLevel(logging.INFO if acc.is_main_process else logging.WARNING)
    if tc.report_to not in ("all", "none") and tc.report_to not in [str(t) for t in acc.log_with]:
        raise NcpError(f"train.report_to={tc.report_to}: the {tc.report_to} package is not installed "
                       f"(pip install {tc.report_to}, or train.report_to=none)")
    if tc.mixed_precision == "fp16" and acc.scaler is None:
        raise NcpError("train.mixed_precision=fp16 needs a GPU (accelerate has no fp16 autocast or GradScaler on "
                       f"{acc.device.type}); use bf16 there")
    return acc


def build_data(cfg: Config, acc):
    """This process's loader: dataset plus one ShardSampler (ncp/data) that resumes at any batch."""
    from .data.loader import build_dataloader

    tc, m = cfg.train, cfg.model
    loader = build_dataloader(cfg.data, tc.batch_size, tc.seed, tc.output_dir, m.pretrained, m.vae,
                              acc.process_index, acc.num_processes)
    if loader.sampler.batches_per_epoch == 0:
        raise NcpError(f"data: {len(loader.dataset)} pairs are fewer than train.batch_size={tc.batch_size} "
                       f"x {acc.num_processes} processes")
    return loader


@dataclass
class Parts:
    models: Models
    schedule: object  # the family's noise process (ncp.diffusion.Schedule or ncp.flow.FlowSchedule)
    encoder: torch.nn.Module | None  # f
    params: list  # the LoRA's trainable (fp32) parameters
    arch: str
    unet: torch.nn.Module | None = None  # the policy U-Net as accelerate prepared it (DDP-wrapped on several processes)


def build_models(cfg: Config, acc) -> Parts:
    """Algorithm 1, lines 1-2: the policy is the base denoiser plus LoRA, the reference is the same denoiser with
    LoRA off, f is the family's frozen encoder on the base denoiser, made before LoRA is added."""
    from accelerate.utils import set_seed

    m, tc = cfg.model, cfg.train
    models = load_models(m.pretrained, m.arch, m.vae, m.revision, m.variant, DTYPES[tc.mixed_precision], acc.device,
                         m.text_encoder_3, m.quantize)
    cfg.model.arch = models.arch  # config.yaml records the detected family
    models.family.configure(models, cfg)             # family-only settings (flux: guidance, T5 length)
    if cfg.data.cache_dir:  # latents and text embeddings come from the cache: free the VAE and text encoders
        models.vae, models.text_encoders = None, []  # (validation loads them again for its images)
    encoder = None
    if cfg.objective.space == "perceptual":
        encoder = models.family.encoder(models.denoiser, cfg.encoder)
    set_seed(tc.seed)  # the same LoRA init on every process and every run with this seed
    params = add_lora(models.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.init, cfg.lora.targets)
    if tc.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    models.unet.train()
    process = models.family.noise_process(models.scheduler, cfg.objective, cfg.data.resolution)
    parts = Parts(models, process, encoder, params, models.arch)
    apply_fast_path(parts, tc)                        # train.channels_last, train.compile (docs/training.md "Fast path")
    return parts


def build_optimizer(cfg: Config, parts: Parts, acc, max_steps: int):
    """8-bit AdamW (bitsandbytes; warned fallback to torch AdamW) at lr x effective batch, and its LR schedule."""
    from diffusers.optimization import get_scheduler

    o, tc = cfg.optim, cfg.train
    effective_batch = tc.batch_size * tc.grad_accum * acc.num_processes
    lr = o.lr * effective_batch if o.scale_lr else o.lr
    kw = dict(lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    optimizer = adamw8bit(parts.params, **kw) if o.optimizer == "adamw8bit" else torch.optim.AdamW(parts.params, **kw)
    lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=max_steps)
    log.info("%s %s-space %s on %s: lr %.3g (effective batch %d), %d trainable LoRA parameters%s", parts.arch,
             cfg.objective.space, cfg.objective.loss, cfg.model.pretrained, lr, effective_batch,
             sum(p.numel() for p in parts.params),
             f", perceptual error: {cfg.encoder.error}" if parts.encoder is not None else "")
    return optimizer, lr_scheduler


def adamw8bit(params: list, **kw) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW, or torch's AdamW with a warning where bitsandbytes does not work on the params'
    device. It takes one 8-bit step on a probe tensor there first: a build without a library for this CUDA builds
    the optimizer and fails only at its first step, after the models and the data have loaded."""
    try:
        import bitsandbytes as bnb

        probe = torch.zeros(4096, device=params[0].device, requires_grad=True)  # 8-bit state from 4096 elements on
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], **kw).step()
        return bnb.optim.AdamW8bit(params, **kw)
    except Exception as e:  # no bitsandbytes build for this platform / device
        warnings.warn(f"bitsandbytes AdamW8bit unavailable ({type(e).__name__}: {e}); falling back to torch.optim.AdamW")
        return torch.optim.AdamW(params, **kw)


# -- one micro-step ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode(parts: Parts, batch: dict, resolution: int):
    """Latents x0 (2B, C, h, w) = [winners; losers] and conditioning (2B rows)."""
    vae = parts.models.vae
    if "latents" in batch:
        x0 = to_device(batch["latents"], parts.models.denoiser.device).float()
    else:
        pixels = to_device(batch["pixel_values"], vae.device).to(vae.dtype)
        # the posterior mean (deterministic, no RNG draw), as the latent cache stores it
        x0 = parts.models.family.to_latents(vae, vae.encode(pixels).latent_dist.mean.float())
    cond = build_cond(parts.models, batch["prompts"], batch.get("original_size"), batch.get("crop_top_left"),
                      (resolution, resolution), batch.get("prompt_embeds"), batch.get("pooled_prompt_embeds"))
    return x0, cond


# -- watching a run ----------------------------------------------------------------------------------------------
def validation_pipeline(cfg: Config, parts: Parts, acc):
    """The family's diffusers pipeline around the training components (LoRA on), for validation images."""
    mdl, m = parts.models, cfg.model
    family = mdl.family
    scheduler = family.sampling_scheduler(mdl.scheduler.config)
    denoiser = acc.unwrap_model(parts.unet)
    components = {"scheduler": scheduler, family.denoiser_key: denoiser, **family.pipeline_extras(m)}
    if mdl.vae is None:  # freed while training from the cache: load them for these images only
        if m.vae is not None:
            from diffusers import AutoencoderKL

            components["vae"] = AutoencoderKL.from_pretrained(m.vae, torch_dtype=denoiser.dtype)
        pipe = family.pipeline_class.from_pretrained(m.pretrained, revision=m.revision, variant=m.variant,
                                                     torch_dtype=denoiser.dtype, **components)
        pipe.to(acc.device)
    else:  # tokenizer(_2, _3) and text_encoder(_2, _3): one, two or three of them
        text = {f"{kind}{suffix}": obj for suffix, tok, enc in zip(("", "_2", "_3"), mdl.tokenizers, mdl.text_encoders)
                for kind, obj in (("tokenizer", tok), ("text_encoder", enc))}
        pipe = family.pipeline_class(**{"vae": mdl.vae, **text, **components})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_validation_grid(cfg: Config, acc, parts: Parts, step: int) -> Path | None:
    """Render the validation prompts at fixed seeds into validation/step-<step>.png, log it to the trackers and,
    with train.validation_reward, score it into validation/rewards.jsonl."""
    from diffusers.utils import make_image_grid

    tc, path = cfg.train, None
    if acc.is_main_process and tc.validation_prompts:
        import numpy as np

        unet = acc.unwrap_model(parts.unet)
        unet.eval()
        res, pipe = cfg.data.resolution, validation_pipeline(cfg, parts, acc)
        # eagerly: sampling shapes (classifier-free guidance doubles the batch) would compile graphs of their own
        with torch.no_grad(), acc.autocast(), torch.compiler.set_stance("force_eager"):
            images = [pipe(p, num_inference_steps=tc.validation_steps, guidance_scale=tc.validation_guidance,
                           height=res, width=res, generator=torch.Generator().manual_seed(i),
                           **parts.models.family.sampling_kwargs(unet)).images[0]
                      for i, p in enumerate(tc.validation_prompts)]
        unet.train()
        grid = make_image_grid(images, rows=1, cols=len(images))
        path = Path(tc.output_dir) / "validation" / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"validation": np.asarray(grid)[None]}, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"validation": [grid]}, step)
        if tc.validation_reward:
            score_validation_images(cfg, acc, images, step)
    acc.wait_for_everyone()
    return path


def score_validation_images(cfg: Config, acc, images, step: int) -> None:
    """Mean reward of the validation images (reward vs step during training, the paper's Figure 3)."""
    import json

    name = cfg.train.validation_reward
    scores = validation_scorer(cfg, acc)(images, list(cfg.train.validation_prompts))
    mean = sum(scores) / len(scores)
    acc.log({f"validation/{name}": mean}, step=step)
    with open(Path(cfg.train.output_dir) / "validation" / "rewards.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "reward": name, "mean": mean, "scores": scores}) + "\n")


def validation_scorer(cfg: Config, acc):
    """train.validation_reward's scorer, loaded once per process."""
    from .evaluate import make_scorer

    name = cfg.train.validation_reward
    return _scorers.get(name) or _scorers.setdefault(name, make_scorer(name, str(acc.device)))


_scorers: dict = {}  # reward models load once per process


# -- command line ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None, loss: str, description: str) -> Run:
    """Command line of the train_ncp_*.py scripts: --config FILE [key.sub=value ...]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_args(argv, loss, description)
    return train(cfg, resume_command(loss, argv))


def parse_args(argv: list[str] | None, loss: str, description: str) -> Config:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="keys (key.sub=value), with their defaults and reasons:\n" + describe_keys())
    p.add_argument("--config", help="YAML file holding what differs from the defaults (configs/*.yaml)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the YAML")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides, **{"objective.loss": loss})
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        raise SystemExit(0)
    return cfg


def resume_command(loss: str, argv: list[str]) -> str:
    """The command that continues this run: the same arguments with train.resume_from=latest."""
    keep = [a for a in argv if not a.startswith(("train.resume_from=", "train.overwrite="))]
    script = f"train_ncp_{loss}.py"
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by `accelerate launch`
        n = int(os.environ.get("WORLD_SIZE", "1"))
        machines = n // int(os.environ.get("LOCAL_WORLD_SIZE", n))  # torchrun's processes per machine
        launcher = ["accelerate", "launch", "-q", "--num_processes", str(n), "--num_machines", str(machines)]
        if machines > 1:  # as printed, for the first machine; every machine runs it with its own --machine_rank
            launcher += ["--machine_rank", "0", "--main_process_ip", os.environ.get("MASTER_ADDR", "HOST"),
                         "--main_process_port", os.environ.get("MASTER_PORT", "29500")]
        launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launcher = ["python"]
    return shlex.join([*launcher, script, *keep, "train.resume_from=latest"])
