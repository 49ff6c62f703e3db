"""Toy alignment benchmark: reward vs step of NCP and latent DPO/CPO/SFT (the paper's Figure 3 in miniature).

1. Base model. The tiny SD1.5 pipeline (ncp.tiny) is trained on the built-in toy shapes: its VAE as an
   autoencoder on winner and loser images, then its U-Net with plain epsilon-MSE on the winners'
   latents with their captions (10% empty captions, so classifier-free guidance works; text encoder
   frozen). U-Net training stops as soon as the sampled images' toy reward passes a point between
   chance and the winners' 1.0 (--base-target), so the base follows captions only partly. That check
   uses other prompts and seeds than step 3, so the base's score in the table is not selected for luck.
2. From that base, each method trains for the same steps on the same pairs through the real
   scripts (`train_ncp_{dpo,cpo,sft}.main`), with a checkpoint every K steps.
   beta, per space, once: beta = 1 / median |err_w - err_l| over the base model's errors on the
   training pairs, so beta * (error gap) is O(1) in both spaces (perceptual errors of the tiny
   U-Net are ~1e-5, latent ~1e-1); the authors' settings are the same rule at SD scale.
   lr is one value for all runs: with Adam the step size does not depend on the loss scale, once
   Adam's eps is far below the gradients (optim.eps=1e-12: NCP-SFT's gradients are ~1e-8).
3. Every checkpoint (and the base, step 0) samples the same prompts with the same seeds and is
   scored with `ncp.data.toy.toy_reward` (ncp.curves). Prints a reward-vs-step table; writes
   curves.png, curves.json/csv and toy_alignment.json.

    python benchmarks/toy_alignment.py --out outputs/toy-alignment          # about 20 minutes on 2 CPU cores
    python benchmarks/toy_alignment.py --smoke --out /tmp/toy-smoke         # seconds: the code runs
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the training scripts and ncp, from a clean checkout

from ncp.data.loader import to_tensor  # noqa: E402
from ncp.data.toy import (BACKGROUNDS, COLOURS, SHAPES, parse_caption, render, toy_pair, toy_prompts,  # noqa: E402
                          toy_reward)

METHODS = [("NCP-DPO", "dpo", "perceptual"), ("latent DPO", "dpo", "latent"),
           ("NCP-SFT", "sft", "perceptual"), ("latent SFT", "sft", "latent"),
           ("NCP-CPO", "cpo", "perceptual"), ("latent CPO", "cpo", "latent")]
FULL = dict(vae_steps=200, unet_max_steps=1500, unet_eval_every=150, unet_batch=16, unet_lr=2e-3, steps=120,
            eval_every=30, pairs=8, num_pairs=512, prompts=16, seeds=2, sample_steps=10, lr=1e-3, rank=8)
SMOKE = dict(vae_steps=3, unet_max_steps=4, unet_eval_every=2, unet_batch=4, unet_lr=2e-3, steps=2, eval_every=1,
             pairs=2, num_pairs=8, prompts=2, seeds=1, sample_steps=2, lr=5e-4, rank=4)
PRETRAIN_SEED = 1  # pretraining images come from another toy stream than the preference pairs (data.toy_seed=0)


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


# ---------------------------------------------------------------- reference levels of the toy reward
def reference_levels(prompts: list[str], size: int = 32) -> dict:
    """Toy reward of: the exact image (1.0), a loser (one attribute wrong, as in the pairs) and chance
    (a rendered image of a uniformly random caption); means over the eval prompts."""
    rng = random.Random(0)
    loser, chance = [], []
    for caption in prompts:
        colour, shape, background = parse_caption(caption)
        if rng.random() < 0.5:  # as ncp.data.toy.toy_pair: wrong colour or wrong shape
            bad = (rng.choice([c for c in COLOURS if c != colour]), shape, background)
        else:
            bad = (colour, rng.choice([s for s in SHAPES if s != shape]), background)
        loser.append(toy_reward(render(*bad, size=size), caption))
        other = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS)))
        chance.append(toy_reward(render(*other, size=size), caption))
    return dict(winner=1.0, loser=statistics.mean(loser), chance=statistics.mean(chance))


# ---------------------------------------------------------------- 1. the base model
def pretrain_base(out: Path, cfg: dict, base_target: float, check_prompts, seeds, guidance: float,
                  time_cap_s: float, log=print) -> dict:
    """Train the tiny pipeline's VAE, then U-Net, on toy images; save it to out/base. Returns stats."""
    from diffusers import StableDiffusionPipeline

    from ncp.conditioning import encode_prompts
    from ncp.curves import score_lora
    from ncp.diffusion import Schedule
    from ncp.evaluate import make_scorer
    from ncp.models import Models
    from ncp.tiny import build_tiny_pipeline

    t_start = time.perf_counter()
    build_tiny_pipeline(out / "init", "sd15", seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(out / "init", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n = max(64, cfg["num_pairs"])
    pairs = [toy_pair(PRETRAIN_SEED, i, 32) for i in range(n)]
    captions = [c for c, _, _ in pairs]
    winners = torch.stack([to_tensor(w) for _, w, _ in pairs])
    images = torch.cat([winners, torch.stack([to_tensor(l) for _, _, l in pairs])])
    g = torch.Generator().manual_seed(0)

    # VAE: reconstruction + a small KL (weight 1e-6, as SD's KL-f8 autoencoder) on all toy images
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(cfg["vae_steps"]):
        x = images[torch.randint(0, len(images), (32,), generator=g)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    log(f"VAE trained in {time.perf_counter() - t_start:.0f} s")
    with torch.no_grad():
        mean = vae.encode(winners).latent_dist.mean
        recon = vae.decode(mean).sample
    vae.register_to_config(scaling_factor=float(1 / mean.std()))  # unit-variance latents, as SD's 0.18215
    latents = mean * vae.config.scaling_factor
    vae_reward = statistics.mean(toy_reward(r, c) for r, c in zip(recon, captions))
    log(f"VAE: {cfg['vae_steps']} steps, recon MSE {F.mse_loss(recon, winners).item():.4f}, "
        f"toy reward of reconstructed winners {vae_reward:.3f} (ceiling), scaling factor {vae.config.scaling_factor:.3f}")

    # U-Net: epsilon-MSE on the winners' latents; captions dropped 10% of the time (classifier-free guidance)
    unet = pipe.unet
    schedule = Schedule.from_scheduler(pipe.scheduler)
    models = Models("sd15", unet, vae, [pipe.tokenizer], [pipe.text_encoder], pipe.scheduler)
    ehs = encode_prompts(models, captions).encoder_hidden_states
    empty = encode_prompts(models, [""]).encoder_hidden_states
    scorer = make_scorer("toy")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["unet_lr"])
    target, bs = base_target, cfg["unet_batch"]
    history, step = [], 0
    while True:
        if step % cfg["unet_eval_every"] == 0 or step == cfg["unet_max_steps"]:
            with torch.no_grad():
                reward = score_lora(pipe, check_prompts, seeds, scorer, batch_size=64, steps=cfg["sample_steps"],
                                    guidance=guidance, resolution=32)
            history.append(dict(step=step, reward=reward))
            log(f"U-Net step {step}: toy reward {reward:.4f} (target {target:.4f}), {time.perf_counter() - t_start:.0f} s")
            if reward >= target or step >= cfg["unet_max_steps"] or time.perf_counter() - t_start > time_cap_s:
                break
        unet.train().requires_grad_(True)
        idx = torch.randint(0, len(latents), (bs,), generator=g)
        x0 = latents[idx]
        cond = torch.where((torch.rand(bs, generator=g) < 0.1).view(-1, 1, 1), empty, ehs[idx])
        t = torch.randint(0, schedule.num_timesteps, (bs,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = F.mse_loss(unet(schedule.q_sample(x0, t, eps), t, encoder_hidden_states=cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    unet.eval().requires_grad_(False)
    pipe.save_pretrained(out / "base")
    return dict(vae_steps=cfg["vae_steps"], vae_recon_reward=vae_reward, unet_steps=step, history=history,
                base_reward=history[-1]["reward"], target=target, seconds=time.perf_counter() - t_start)


# ---------------------------------------------------------------- 2. beta per space, then the runs
def choose_betas(base: Path, cfg: dict) -> dict:
    """beta = 1 / median |err_w - err_l| of the base model on the training pairs, per space (module docstring)."""
    from ncp.conditioning import build_cond
    from ncp.data.config import DataConfig
    from ncp.data.loader import build_dataloader
    from ncp.diffusion import Schedule
    from ncp.encoder import PerceptualEncoder
    from ncp.models import load_models
    from ncp.objective import ObjectiveConfig, compute_objective, sample_randomness

    models = load_models(str(base))
    schedule = Schedule.from_scheduler(models.scheduler)
    encoder = PerceptualEncoder(models.unet)
    loader = build_dataloader(DataConfig(source="toy", toy_num_pairs=cfg["num_pairs"]), 16, seed=0)
    g = torch.Generator().manual_seed(0)
    gaps = {"perceptual": [], "latent": []}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 4:
                break
            x0 = models.vae.encode(batch["pixel_values"]).latent_dist.mean * models.vae.config.scaling_factor
            cond = build_cond(models, batch["prompts"])
            rnd = sample_randomness(len(batch["prompts"]), x0.shape[1:], schedule.num_timesteps, g)
            for space in gaps:
                _, m = compute_objective(models.unet, encoder, schedule, x0, cond, rnd,
                                         ObjectiveConfig(loss="cpo", space=space, beta=1.0))
                gaps[space] += (m["err_w"] - m["err_l"]).abs().tolist()
    return {space: 1.0 / max(statistics.median(v), 1e-12) for space, v in gaps.items()}


def train_run(name: str, loss: str, space: str, base: Path, out: Path, cfg: dict, beta: float) -> Path:
    """One preference run through the real training script; returns its folder."""
    from accelerate.state import AcceleratorState

    # each run starts like a new process: accelerate keeps its state in a singleton (as tests/test_train.py)
    AcceleratorState._reset_state(reset_partial_state=True)
    run_dir = out / "runs" / slug(name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun must not score an earlier run's checkpoints
    argv = ["--config", str(ROOT / f"configs/tiny_sd15_ncp_{loss}.yaml"),
            f"model.pretrained={base}", f"train.output_dir={run_dir}", f"objective.space={space}",
            f"objective.beta={beta}", f"optim.lr={cfg['lr']}", "optim.scale_lr=false", "optim.warmup_steps=0",
            "optim.eps=1e-12", f"lora.rank={cfg['rank']}", f"train.batch_size={cfg['pairs']}",
            f"train.max_steps={cfg['steps']}", f"train.checkpoint_every={cfg['eval_every']}",
            "train.keep_checkpoints=100000", "train.validate_every=0", "train.validation_prompts=[]",
            "train.seed=0", "data.source=toy", "data.toy_seed=0", f"data.toy_num_pairs={cfg['num_pairs']}",
            "data.resolution=32"]
    importlib.import_module(f"train_ncp_{loss}").main(argv)
    return run_dir


# ---------------------------------------------------------------- 3. the table
def format_table(result: dict) -> str:
    runs = result["curves"]["runs"]
    names = [name for name, _, _ in METHODS if slug(name) in runs]
    steps = sorted({r["step"] for n in names for r in runs[slug(n)]})
    lines = ["| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in steps:
        cells = [next((f"{r['reward']:.4f}" for r in runs[slug(n)] if r["step"] == s), "") for n in names]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    last = {n: runs[slug(n)][-1]["reward"] - runs[slug(n)][0]["reward"] for n in names}
    lines.append("| gain | " + " | ".join(f"{last[n]:+.4f}" for n in names) + " |")
    ref = result["reference"]
    b = result["base"]
    lines += ["", f"toy reward levels on the eval prompts: chance {ref['chance']:.4f}, loser image {ref['loser']:.4f}, "
                  f"winner image {ref['winner']:.4f}; VAE reconstruction of winners {b['vae_recon_reward']:.4f}; "
                  f"base after {b['unet_steps']} U-Net steps {b['base_reward']:.4f} on the stop check's own prompts"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toy-alignment")
    p.add_argument("--minutes-budget", type=float, default=20.0,
                   help="time cap of the whole run; base pretraining stops at 35%% of it even below --base-target")
    p.add_argument("--steps", type=int, help="optimizer steps per method (default 120; smoke 2)")
    p.add_argument("--eval-every", type=int, help="checkpoint and score every K steps (default 20)")
    p.add_argument("--pairs", type=int, help="preference pairs per step (default 8)")
    p.add_argument("--lr", type=float, help="LoRA lr, one for every run (default 1e-3)")
    p.add_argument("--base-target", type=float, default=0.5,
                   help="stop base pretraining when reward >= chance + this x (winner - chance)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance when sampling")
    p.add_argument("--methods", nargs="+", default=[n for n, _, _ in METHODS], help="subset of the methods")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for these tiny models on a shared 2-core CPU")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs, in seconds")
    a = p.parse_args(argv)
    cfg = dict(SMOKE if a.smoke else FULL)
    for key in ("steps", "eval_every", "pairs", "lr"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)
    unknown = set(a.methods) - {n for n, _, _ in METHODS}
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {[n for n, _, _ in METHODS]}")
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from ncp.curves import curves
    from ncp.evaluate import make_scorer
    from ncp.generate import load_pipeline

    prompts = toy_prompts(cfg["prompts"], seed=123)  # held fixed for every checkpoint of every run
    seeds = list(range(cfg["seeds"]))
    ref = reference_levels(prompts)
    # The stop check uses its own prompts and seeds: stopping at the first check above the target picks
    # an upward fluctuation, and scoring step 0 on the same images would carry that luck into the table
    # (the first full run did: every method, SFT on winners included, then "lost" reward).
    stop_prompts, stop_seeds = toy_prompts(cfg["prompts"], seed=456), [100 + s for s in seeds]
    stop_ref = reference_levels(stop_prompts)
    target = stop_ref["chance"] + a.base_target * (stop_ref["winner"] - stop_ref["chance"])
    base = pretrain_base(out, cfg, target, stop_prompts, stop_seeds, a.guidance, 0.35 * 60 * a.minutes_budget)
    betas = choose_betas(out / "base", cfg)
    print(f"beta per space (1 / median |err_w - err_l| on the base): " +
          ", ".join(f"{k} {v:.4g}" for k, v in betas.items()))

    run_dirs, train_s = [], {}
    for name, loss, space in METHODS:
        if name in a.methods:
            t = time.perf_counter()
            run_dirs.append(train_run(name, loss, space, out / "base", out, cfg, betas[space]))
            train_s[name] = time.perf_counter() - t
            print(f"{name}: {cfg['steps']} steps in {train_s[name]:.0f} s")
    pipe = load_pipeline(str(out / "base"), "cpu")
    with torch.no_grad():
        points = curves(run_dirs, pipe, prompts, seeds, make_scorer("toy"), out, "toy reward", batch_size=64,
                        steps=cfg["sample_steps"], guidance=a.guidance, resolution=32)
    result = dict(setup=dict(cfg, guidance=a.guidance, base_target=a.base_target, threads=a.threads,
                             methods=a.methods, betas=betas),
                  reference=ref, base=base, train_seconds=train_s, curves=points,
                  minutes=(time.perf_counter() - t0) / 60)
    (out / "toy_alignment.json").write_text(json.dumps(result, indent=2))
    print(format_table(result))
    print(f"total {result['minutes']:.1f} min; plot {out / 'curves.png'}, numbers {out / 'toy_alignment.json'}")
    if not all(math.isfinite(r["reward"]) for rows in points["runs"].values() for r in rows):
        raise SystemExit("non-finite reward")
    return result


if __name__ == "__main__":
    main()
