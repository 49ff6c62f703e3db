"""The training loop shared by train_ncp_dpo.py, train_ncp_cpo.py and train_ncp_sft.py.

`train(cfg)` is Algorithm 1 of the paper; `Trainer` holds what it needs: the parts (lines 1-2), the
batches (line 4), latents and conditioning, the per-pair randomness (lines 5, 7, 10) and optimizer
steps (line 19). The objective (lines 8-18) is `ncp.objective.compute_objective`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .conditioning import build_cond
from .config import Config, load_config, save_config
from .diffusion import Schedule
from .encoder import PerceptualEncoder
from .errors import NcpError
from .models import LORA_FILE, add_lora, load_models, save_lora
from .objective import compute_objective, sample_randomness

log = logging.getLogger("ncp")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(cfg: Config) -> "Trainer":
    """Algorithm 1 (errata applied); the loss and its space come from cfg.objective."""
    trainer = Trainer(cfg)  # 1-2: policy = base + LoRA, reference = LoRA off, f = frozen copy of the down path
    for batch in trainer.batches():  # 3-4: repeat; (x0_w, x0_l, c) ~ D
        x0, cond = trainer.encode(batch)
        rnd = trainer.sample_randomness(x0)  # 5, 7, 10: t, eps, z per pair, shared by winner and loser
        with trainer.accumulate():
            loss, metrics = compute_objective(  # 6, 8-18: x_t, reverse steps to t-1, errors in f's space, loss
                trainer.unet, trainer.encoder, trainer.schedule, x0, cond, rnd, trainer.cfg.objective
            )
            trainer.backward_and_step(loss, metrics)  # 19: gradient step on the LoRA
    trainer.finish()
    return trainer


def main(argv: list[str] | None, loss: str, description: str) -> "Trainer":
    """Command line of the train_ncp_*.py scripts: --config FILE [key.sub=value ...]."""
    return train(parse_args(argv, loss, description))


def parse_args(argv: list[str] | None, loss: str, description: str) -> Config:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML file holding what differs from the defaults (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the YAML")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides, **{"objective.loss": loss})


class ShardSampler(Sampler):
    """This process's share of one epoch's permutation (seeded by seed and epoch), from `start` on.

    Every process draws the same permutation and takes every world-th index, so a resumed run can
    start mid-epoch without decoding the skipped images."""

    def __init__(self, n: int, seed: int, rank: int, world: int, batch_size: int):
        self.n, self.seed, self.rank, self.world, self.batch_size = n, seed, rank, world, batch_size
        self.epoch, self.start = 0, 0
        self.batches_per_epoch = (n // world) // batch_size
        if self.batches_per_epoch == 0:
            raise NcpError(f"data: {n} pairs are fewer than train.batch_size={batch_size} x {world} processes")

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.start = epoch, batch * self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[self.rank :: self.world][: self.batches_per_epoch * self.batch_size]
        return iter(order[self.start :].tolist())


class Trainer:
    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        tc = cfg.train
        self.out = Path(tc.output_dir)
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=tc.grad_accum, mixed_precision=tc.mixed_precision, log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(message)s")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")

        # data first: a bad file or column fails before minutes of model loading
        from .data.loader import build_dataloader

        base = build_dataloader(cfg.data, tc.batch_size, tc.seed, str(self.out), cfg.model.pretrained, cfg.model.vae)
        self.dataset = base.dataset
        self.sampler = ShardSampler(len(self.dataset), tc.seed, acc.process_index, acc.num_processes, tc.batch_size)
        self.loader = DataLoader(self.dataset, batch_size=tc.batch_size, sampler=self.sampler, drop_last=True,
                                 collate_fn=base.collate_fn, num_workers=cfg.data.num_workers,
                                 pin_memory=torch.cuda.is_available())
        self.max_steps = tc.max_steps
        if tc.max_epochs is not None:
            self.max_steps = math.ceil(tc.max_epochs * self.sampler.batches_per_epoch / tc.grad_accum)

        # Algorithm 1, lines 1-2: the policy is the base U-Net plus LoRA, the reference is the same U-Net
        # with LoRA off, f is a frozen copy of the base U-Net's down path, made before LoRA is added.
        weight_dtype = DTYPES[tc.mixed_precision]
        m = cfg.model
        self.models = load_models(m.pretrained, m.arch, m.vae, m.revision, m.variant, weight_dtype, acc.device)
        self.arch = self.models.arch
        self.schedule = Schedule.from_scheduler(self.models.scheduler)
        self.encoder = None
        if cfg.objective.space == "perceptual":
            self.encoder = PerceptualEncoder(self.models.unet, cfg.encoder.features, cfg.encoder.pool, cfg.encoder.error)
        set_seed(tc.seed)  # the same LoRA init on every process and every run with this seed
        params = add_lora(self.models.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.init, cfg.lora.targets)
        if tc.gradient_checkpointing:
            self.models.unet.enable_gradient_checkpointing()
        self.models.unet.train()

        effective_batch = tc.batch_size * tc.grad_accum * acc.num_processes
        lr = cfg.optim.lr * effective_batch if cfg.optim.scale_lr else cfg.optim.lr
        optimizer = self._optimizer(params, lr)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                          num_training_steps=self.max_steps)
        self.unet, self.optimizer = acc.prepare(self.models.unet, optimizer)
        self.params = params
        self.effective_batch = effective_batch

        # per-process stream for t, eps, z: different pairs on each process, restored exactly on resume
        self.generator = torch.Generator().manual_seed(tc.seed * 1_000_003 + 7919 * acc.process_index + 1)

        self.step, self.bad_in_a_row, self.skipped = 0, 0, 0
        self._micro, self._t0 = [], time.perf_counter()  # this optimizer step's micro-step metrics, its start
        resume = resolve_resume(tc.output_dir, tc.resume_from)
        if resume is not None:
            state = load_checkpoint(acc, resume, self.unet, self.optimizer, self.lr_scheduler, self.generator)
            self.step, self.skipped = state["step"], state["skipped"]
            log.info("resumed from %s at step %d", resume, self.step)
        if acc.is_main_process:
            self._truncate_metrics()
        acc.init_trackers("ncp", config={k: str(v) for k, v in _flat(cfg.to_dict()).items()})
        log.info("%s %s-space %s on %s: lr %.3g (effective batch %d), %d pairs, %d trainable LoRA parameters",
                 self.arch, cfg.objective.space, cfg.objective.loss, m.pretrained, lr, effective_batch,
                 len(self.dataset), sum(p.numel() for p in params))

    # -- parts -----------------------------------------------------------------------------------------
    def _optimizer(self, params, lr):
        o = self.cfg.optim
        kw = dict(lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        if o.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb

                opt = bnb.optim.AdamW8bit(params, **kw)
                return opt
            except Exception as e:  # no bitsandbytes build for this platform / device
                warnings.warn(f"bitsandbytes AdamW8bit unavailable ({e}); falling back to torch.optim.AdamW")
        return torch.optim.AdamW(params, **kw)

    # -- Algorithm 1, line 4: (x0_w, x0_l, c) ~ D --------------------------------------------------------
    def batches(self):
        """Yield batches until max_steps optimizer steps are done, resuming at the exact data position."""
        micro = self.step * self.cfg.train.grad_accum
        epoch, batch = divmod(micro, self.sampler.batches_per_epoch)
        self.progress = self._progress()
        self._t0 = time.perf_counter()
        while self.step < self.max_steps:
            self.sampler.set_position(epoch, batch)
            self.dataset.set_epoch(epoch)
            for item in self.loader:
                yield item
                if self.step >= self.max_steps:
                    return
            epoch, batch = epoch + 1, 0

    def _progress(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.max_steps, initial=self.step, disable=not self.accelerator.is_main_process,
                    desc=f"NCP {self.cfg.objective.loss}" if self.cfg.objective.space == "perceptual"
                    else f"latent {self.cfg.objective.loss}")

    @torch.no_grad()
    def encode(self, batch):
        """Latents x0 (2B, C, h, w) = [winners; losers] and conditioning (2B rows)."""
        dev = self.accelerator.device
        if "latents" in batch:
            x0 = batch["latents"].to(dev, torch.float32)
        else:
            vae = self.models.vae
            pixels = batch["pixel_values"].to(dev, vae.dtype)
            # the posterior mean (deterministic, no RNG draw), as the latent cache stores it
            x0 = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
        res = self.cfg.data.resolution
        cond = build_cond(self.models, batch["prompts"], batch.get("original_size"), batch.get("crop_top_left"),
                          (res, res), batch.get("prompt_embeds"), batch.get("pooled_prompt_embeds"))
        return x0, cond

    # -- Algorithm 1, lines 5, 7, 10 ---------------------------------------------------------------------
    def sample_randomness(self, x0):
        rnd = sample_randomness(x0.shape[0] // 2, x0.shape[1:], self.schedule.num_timesteps, self.generator,
                                self.cfg.objective.target)
        return rnd.to(x0.device)

    def accumulate(self):
        """One micro-step: gradients sync and the optimizer steps on the last of grad_accum."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.accumulate(self.unet))
        stack.enter_context(self.accelerator.autocast())
        return stack

    # -- Algorithm 1, line 19 ------------------------------------------------------------------------------
    def backward_and_step(self, loss: torch.Tensor, metrics: dict) -> None:
        acc = self.accelerator
        self._micro.append({"loss": loss.detach().float(), **{k: v.float().mean() for k, v in metrics.items()}})
        acc.backward(loss)
        if not acc.sync_gradients:
            return
        grad_norm = acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        means = {k: torch.stack([m[k] for m in self._micro]).mean() for k in self._micro[0]}
        means = {k: v.mean().item() for k, v in acc.gather_for_metrics(means).items()}
        finite = math.isfinite(means["loss"]) and grad_norm is not None and math.isfinite(float(grad_norm))
        if finite:
            self.optimizer.step()
            self.lr_scheduler.step()
            self.bad_in_a_row = 0
        else:
            if acc.scaler is not None:  # fp16: the GradScaler sees the inf/NaN, skips the update, lowers its scale
                self.optimizer.step()
            self.bad_in_a_row += 1
            self.skipped += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s), step skipped",
                        self.step + 1, means["loss"], float(grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed, self._t0 = time.perf_counter() - self._t0, time.perf_counter()
        self._micro = []
        record = {"step": self.step, **means, "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "skipped_steps": self.skipped, "samples_per_s": self.effective_batch / elapsed}
        self._log(record)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{means['loss']:.4f}", acc=f"{means.get('implicit_acc', float('nan')):.2f}")
        tc = self.cfg.train
        if self.bad_in_a_row >= tc.max_bad_steps:
            path = self.save_checkpoint()
            raise NcpError(f"{self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps={tc.max_bad_steps}); "
                           f"stopped, last good state saved in {path}. Lower optim.lr or use bf16 / fp32.")
        if self.step % tc.checkpoint_every == 0 and self.step < self.max_steps:
            self.save_checkpoint()
        if tc.validate_every and self.step % tc.validate_every == 0 and self.step < self.max_steps:
            self.validate()

    def _log(self, record: dict) -> None:
        if self.step % self.cfg.train.log_every and self.step != self.max_steps:
            return
        self.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """After a resume, drop lines logged after the checkpoint: they will be logged again."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in lines))

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.out, self.step, self.unet, self.arch, self.optimizer,
                               self.lr_scheduler, self.generator, {"skipped": self.skipped},
                               self.cfg.train.keep_checkpoints)

    # -- watching a run ----------------------------------------------------------------------------------------
    def pipeline(self):
        """A diffusers pipeline around the training components (LoRA on), for validation images."""
        from diffusers import DPMSolverMultistepScheduler

        from .models import pipeline_class

        mdl = self.models
        parts = dict(vae=mdl.vae, text_encoder=mdl.text_encoders[0], tokenizer=mdl.tokenizers[0],
                     unet=self.accelerator.unwrap_model(self.unet),
                     scheduler=DPMSolverMultistepScheduler.from_config(mdl.scheduler.config))
        if self.arch == "sdxl":
            parts.update(text_encoder_2=mdl.text_encoders[1], tokenizer_2=mdl.tokenizers[1])
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = pipeline_class(self.arch)(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self) -> Path | None:
        """Render the validation prompts at fixed seeds; save a grid PNG and log it to tensorboard."""
        acc, tc = self.accelerator, self.cfg.train
        path = None
        if acc.is_main_process and tc.validation_prompts:
            import numpy as np

            unet = acc.unwrap_model(self.unet)
            unet.eval()
            res = self.cfg.data.resolution
            pipe = self.pipeline()
            with torch.no_grad(), acc.autocast():
                images = [pipe(p, num_inference_steps=tc.validation_steps, guidance_scale=tc.validation_guidance,
                               height=res, width=res, generator=torch.Generator().manual_seed(i)).images[0]
                          for i, p in enumerate(tc.validation_prompts)]
            unet.train()
            grid = _grid(images)
            path = self.out / "validation" / f"step-{self.step:08d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            tracker = acc.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
            if tc.validation_reward:
                self._score(images)
        acc.wait_for_everyone()
        return path

    def _score(self, images) -> None:
        """Mean reward of the validation images (reward vs step during training, the paper's Figure 3)."""
        from .evaluate import make_scorer

        name = self.cfg.train.validation_reward
        if not hasattr(self, "_scorer"):
            self._scorer = make_scorer(name, str(self.accelerator.device))
        scores = self._scorer(images, list(self.cfg.train.validation_prompts))
        mean = sum(scores) / len(scores)
        self.accelerator.log({f"validation/{name}": mean}, step=self.step)
        with open(self.out / "validation" / "rewards.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "reward": name, "mean": mean, "scores": scores}) + "\n")

    def finish(self) -> Path:
        """Save the final LoRA (diffusers format), a validation grid and, if asked, push to the Hub."""
        acc = self.accelerator
        self.progress.close()
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_lora(acc.unwrap_model(self.unet), self.out, self.arch)
        lora = self.out / LORA_FILE
        self.validate()
        hub = self.cfg.hub
        if acc.is_main_process and hub.repo_id:
            from .hub import push_to_hub

            log.info("uploaded to %s", push_to_hub(str(self.out), hub.repo_id, hub.private, license=hub.license))
        acc.end_training()
        log.info("final LoRA: %s", lora)
        return lora


def _grid(images):
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    return grid


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
