"""Toy alignment benchmark v3: how fast does each preference objective raise a toy reward, per optimizer step and
per counted FLOP? (the paper's claim that NCP reaches a given reward in fewer steps, and its Figure 3 and Table 1,
in miniature, on a CPU)

Every selection rule below is fixed in code and printed (`rules()`) before any test prompt is scored.

0. Prompts. The toy captions ("a <colour> <shape> on a <background> background", 54 of them) are split once,
   by a seeded shuffle, into three disjoint sets: train captions (the preference pairs), validation captions
   (the base's stopping rule and the lr / beta choice) and test captions (every reported number).
1. Base. The tiny pipeline of --arch (ncp.tiny) pretrained on toy images by `ncp.toy_base.pretrain_base` (its
   docstring: VAE, then the denoiser with an EMA) on exact captions with one systematic error, the quickstart's
   (`ncp.toy_base.BASE_DATA`): white and black backgrounds swapped in every caption that names them, so the base
   draws the wrong background for 12 of the 18 test captions (half the toy reward) and gray as asked for the
   other 6. Images are sampled with classifier-free guidance BASE_GUIDANCE. The preference pairs' loser is the
   base's mistake for white and black captions, one other attribute wrong for the gray ones. The EMA is scored on
   the validation captions every `base_check` steps; training stops at the first check where the reward gained
   less than BASE_TOL over the last two checks (the untrained step-0 check never counts as the earlier one), or at
   `base_max` steps. The EMA weights at that check are the base. Each arch's base ships with the project
   (ncp/assets/toy_<arch>_base.safetensors: these settings, stopped by the rule; the U-Net's, the quickstart's, at
   step 1050, the SD3 transformer's at 750, the FLUX transformer's at 1050, at 64 T5 tokens; fp16), and is used
   instead of pretraining it again, at the quick size too (a converged base, not its cap's).
2. Grid. Each of the six objectives (NCP / latent x DPO / CPO / SFT) trains with training seed 0 from the
   base for every lr in the grid (x every beta multiplier for DPO / CPO; beta = multiplier / median
   |err_w - err_l| of the base on the training pairs, per space). The setting with the highest mean
   validation reward at the last step wins (ties: the first tried). Where the winner's lr or beta multiplier is
   the smallest or largest value tried, one more value past that edge (at the grid's ratio) is trained and the
   choice made again, at most `max_ext` times per axis; a choice still on an edge is reported as such
   (`grid` column). NCP-DPO under bf16 (difference and linearized error) takes NCP-DPO's chosen setting, so the
   precision rows differ in precision alone. Two lrs that end level can climb at different speeds, so a speed
   ratio can be a ratio of the chosen lrs: `benchmarks/toy_lr_check.py` retrains one method of a finished run at
   another lr and prints the tables again (on SD3 and FLUX it turned NCP's apparent leads into parity); the
   verdict names it for every NCP / latent pair that chose different lrs.
3. Test. Every method with its chosen setting trains with `seeds` training seeds (seed 0 is the grid's run)
   through the real scripts (`train_ncp_{dpo,cpo,sft}.main`), a checkpoint every `eval_every` steps. Each
   checkpoint and the base render every test caption x `img_seeds` image seeds, scored with `toy_reward`.
4. Cost. The FLOPs of one optimizer step's objective, forward and backward, counted per method on the base with
   the run's LoRA and batch (torch.utils.flop_counter; VAE encoding and the optimizer, alike for every method,
   left out). A checkpoint at step s has cost s x that.
5. Statistics. 95% intervals: percentile bootstrap over test prompts (2000 resamples), one prompt's images
   (all image seeds, all training seeds) one cluster. Differences (NCP - latent) are paired by prompt, at equal
   steps (the last) and at equal FLOPs (the cheaper run's total, the other run interpolated linearly between its
   checkpoints). Learning speed, the headline: the steps (and FLOPs) each method needs to reach 50% and 80% of
   the best method's final mean gain, linear between checkpoints, with intervals from resampling prompts and
   training seeds together; a target a method never reaches is "not reached" (null in the JSON), and an interval
   whose upper end is "not reached" says some resamples never got there.

Outputs in --out: toy_alignment.json (every number: the tables are formatted from it), curves.png (gain vs step
and vs counted FLOPs, 95% bands), table.md (the tables printed at the end), runs/ and base/.

    python benchmarks/toy_alignment.py --out outputs/toy-v3               # full (2 cores: U-Net 1 h 40, SD3 1 h 45, FLUX 35 min)
    python benchmarks/toy_alignment.py --quick --out outputs/toy-v3-quick # shorter runs (U-Net 13 min, SD3 9, FLUX 6)
    python benchmarks/toy_alignment.py --smoke --out /tmp/toy-smoke       # seconds: the code runs

SD3 variant (--arch sd3): the same protocol on the tiny SD3 pipeline (MMDiT, flow matching): its own base
(VAE with SD3's shift and scale, then the transformer with velocity-MSE on logit-normal timesteps, with an
EMA, same stopping rule), the objectives in flow form, f = the first K joint blocks (configs/tiny_sd3_*.yaml:
K = 1 of 4), plus at the full size NCP-DPO with K = 2 and K = 4 (every block) at NCP-DPO's chosen setting, so those rows
differ in K alone; beta is scaled per space and per K. No bf16 rows (tests/test_sd3.py covers precision).

    python benchmarks/toy_alignment.py --arch sd3 --quick --out outputs/toy-sd3-quick

FLUX variant (--arch flux): the same on the tiny FLUX.1 dev pipeline (guidance 3.5, the training sigmas unshifted),
f = the first K double-stream blocks (configs/tiny_flux_*.yaml: K = 2 of 4), plus at the full size NCP-DPO with K = 1
and K = 4. Prompts are encoded at the tiny configs' T5 length, 64 tokens (toy captions have at most 35; dev's
default 512 is padding that made the transformer's work about 6x larger), in the base's pretraining, training,
beta scale, FLOP count and scoring alike (`ncp.toy_base.configured`).

    python benchmarks/toy_alignment.py --arch flux --quick --out outputs/toy-flux-quick

A larger toy for one GPU (--device cuda): 64 px images, the denoiser 4x as wide, 16 pairs per step, 120 steps
(a checkpoint every 20); the base is pretrained for it (not the shipped 32 px one) and everything runs on the GPU.
Sized by counted FLOPs (the dry run's 1.5 TFLOP per NCP-DPO step of 16 pairs; 12.2 GFLOP per denoiser forward of one
image): base at most 1200 steps of 64 images, 0.28e16; about 40 training runs of 120 steps, 0.67e16; about 21,000
test images of 8 guided sampling steps, 0.41e16; validation and base checks, 0.05e16: 1.4e16 FLOP in all, 8 minutes
at 30 TFLOP/s sustained, a guess at what fp32 work on layers this small reaches on an H100 or H200. Never run on a
GPU yet; `bash scripts/gpu_check.sh --stages toy --budget-s 520` runs it (a slower rate runs past the stage's limit,
and its log says how far it got).
--resolution and --width set those sizes on any device; --dry-run builds the pipeline and counts a step.

    python benchmarks/toy_alignment.py --device cuda --out outputs/toy-v3-cuda
    python benchmarks/toy_alignment.py --device cuda --dry-run --out /tmp/toy-cuda   # CPU: builds and counts
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the training scripts and ncp, from a clean checkout
sys.path.insert(0, str(ROOT / "benchmarks"))  # step_cost's FLOP counter

from ncp import families  # noqa: E402
from ncp.toy_base import (BASE_DATA, BASE_GUIDANCE, BASE_TOL, BOOT, SPLIT, SPLIT_SEED, base_check_seeds,  # noqa: E402,F401
                          base_file, bootstrap, configured, per_prompt, pretrain_base, reference_levels, score_images,
                          shipped_base_info, split_captions, toy_settings, write_base, write_train_pairs)

# name -> (loss, space, train.mixed_precision, encoder.error); the first six are the objectives
METHODS = {"NCP-DPO": ("dpo", "perceptual", "no", "difference"), "latent DPO": ("dpo", "latent", "no", "difference"),
           "NCP-CPO": ("cpo", "perceptual", "no", "difference"), "latent CPO": ("cpo", "latent", "no", "difference"),
           "NCP-SFT": ("sft", "perceptual", "no", "difference"), "latent SFT": ("sft", "latent", "no", "difference"),
           "NCP-DPO bf16 difference": ("dpo", "perceptual", "bf16", "difference"),
           "NCP-DPO bf16 linearized": ("dpo", "perceptual", "bf16", "linearized")}
OBJECTIVES = list(METHODS)[:6]
# The transformers: NCP-DPO at other depths of f (encoder.blocks = K) than the tiny configs' (sd3: K = 1 of 4 joint
# blocks; flux: K = 2 of 4 double-stream blocks)
SD3_BLOCKS = {"NCP-DPO K=1": 1, "NCP-DPO K=2": 2, "NCP-DPO K=4": 4}
ALL_METHODS = {**METHODS, **{name: METHODS["NCP-DPO"] for name in SD3_BLOCKS}}  # METHODS stays the sd15 set
DEFAULT_METHODS = {"sd15": list(METHODS), "sd3": OBJECTIVES + ["NCP-DPO K=2", "NCP-DPO K=4"],
                   "flux": OBJECTIVES + ["NCP-DPO K=1", "NCP-DPO K=4"]}
# --quick: the transformers' K rows are left to the full size (the quick size's budget)
QUICK_METHODS = dict(DEFAULT_METHODS, sd3=OBJECTIVES, flux=OBJECTIVES)
RESOLUTION = 32  # toy images and training pixels (the --device cuda toy has its own `resolution`)
PAIRS = [("DPO", "NCP-DPO", "latent DPO"), ("CPO", "NCP-CPO", "latent CPO"), ("SFT", "NCP-SFT", "latent SFT")]

# Sizes. img_seeds x 18 test captions: 270 test images per point (full), 108 (quick). Checkpoints every eval_every steps: the
# learning-speed curves interpolate between them. max_ext: how many times a grid axis may be extended past an edge.
FULL = dict(vae_steps=200, base_max=1800, base_check=150, base_batch=16, base_lr=2e-3, ema=0.995,
            steps=160, eval_every=20, pairs=4, num_pairs=512, rank=8, seeds=3, img_seeds=15, val_seeds=8,
            lrs=[3e-3, 1e-2], beta_mults=[1.0, 4.0], sample_steps=8, max_ext=2, resolution=RESOLUTION, width=1)  # lrs: the quick runs' choices were 3e-3 and 9e-3
QUICK = dict(FULL, base_max=600, steps=40, eval_every=20, img_seeds=6, beta_mults=[1.0], max_ext=1)
SMOKE = dict(vae_steps=3, base_max=4, base_check=2, base_batch=4, base_lr=2e-3, ema=0.9, steps=2, eval_every=1,
             pairs=2, num_pairs=8, rank=4, seeds=2, img_seeds=1, val_seeds=1, lrs=[5e-4], beta_mults=[1.0],
             sample_steps=2, max_ext=1, resolution=RESOLUTION, width=1)  # one-value axes: no extension (tests cover search_grid by hand)
# --device cuda: a larger toy for one GPU: 64 px images (32x32 latents), the tiny denoiser `width` times as wide
# (ncp.tiny.widen), 4x the pairs per step; base, training and scoring on the GPU. Sized by counted FLOPs for about
# 8 minutes on one GPU (the module docstring); never run on a GPU yet (the GPU check's `toy` stage runs it).
# --resolution / --width set the larger sizes on any device (the tests run them on the CPU at the smoke size).
CUDA = dict(FULL, base_max=1200, base_batch=64, steps=120, pairs=16, num_pairs=2048, img_seeds=8, resolution=64,
            width=4)
SPEED_FRACTIONS = (0.5, 0.8)  # learning speed: steps to reach these shares of the best method's final gain


def larger_size(cfg: dict) -> dict:
    """The run's image size and denoiser width where they are not the toy's own (32 px, 1x): {} for the CPU sizes."""
    return {k: cfg[k] for k in ("resolution", "width") if cfg[k] != FULL[k]}


def shipped_base(out: Path, cfg: dict, arch: str) -> dict | None:
    """The arch's shipped toy base (ncp.toy_base.base_file; the U-Net's is the quickstart's), written to out/base,
    where it is the base this run's pretraining would give: the same arch, pretraining settings (but the cap),
    data and guidance, stopped by the rule, so any cap from its stop on gives it (the full size's 1800 steps); the
    quick size's smaller cap takes it too, a converged base in place of a capped one. Weights as shipped (fp16);
    None where it does not apply."""
    weights = base_file(arch)
    if not weights.is_file() or larger_size(cfg):  # the shipped bases are 32 px, 1x
        return None
    info = shipped_base_info(weights)
    settings = {k: v for k, v in info["settings"].items() if k != "base_max"}
    if (info["arch"] != arch or info["stopped_by"] != "rule" or settings != {k: cfg.get(k) for k in settings}
            or info["data"] != BASE_DATA or info["guidance"] != BASE_GUIDANCE
            or info.get("model", {}) != toy_settings(arch)):  # flux: the T5 length it was pretrained at
        return None
    write_base(out / "base", weights)
    return dict({k: info[k] for k in ("vae_steps", "vae_recon_reward", "unet_steps", "history", "stopped_by")},
                model=toy_settings(arch), seconds=0.0,
                shipped=dict(file=f"ncp/assets/{weights.name}", pretraining_seconds=info["seconds"]))


def dry_run(out: Path, arch: str, cfg: dict) -> dict:
    """Build the sized toy's pipeline (the --device cuda toy's by default) on the CPU and count one NCP-DPO and one
    latent DPO step's FLOPs (no training): the larger configuration builds and runs."""
    from ncp.models import load_models
    from ncp.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline(out / "dry-run", arch, width=cfg["width"], resolution=cfg["resolution"])
    params = sum(p.numel() for p in load_models(str(folder)).unet.parameters())
    flops = step_flops(folder, ["NCP-DPO", "latent DPO"], arch, cfg["pairs"], cfg["rank"], cfg["resolution"])
    print(f"dry run ({arch}, {cfg['resolution']} px, width x{cfg['width']}): denoiser {params / 1e6:.2f}M parameters; "
          + ", ".join(f"{m} {f / 1e9:.3g} GFLOP per step of {cfg['pairs']} pairs" for m, f in flops.items()))
    return dict(arch=arch, denoiser_params=params, flops_per_step=flops, setup=cfg)


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


# ---------------------------------------------------------------- 0. prompts and data

# ---------------------------------------------------------------- scoring

# ---------------------------------------------------------------- 1. the base model

# ---------------------------------------------------------------- 2. beta scale, runs
def config_blocks(arch: str) -> int | None:
    """K of f in the arch's tiny NCP config (None: a U-Net's f has no K): what NCP-DPO trains with."""
    from ncp.config import load_config

    return load_config(str(ROOT / f"configs/tiny_{arch}_ncp_dpo.yaml")).encoder.blocks


def space_key(method: str) -> str:
    """Which beta scale a method uses: its space, and for the K rows the perceptual space of their f."""
    return f"perceptual K={SD3_BLOCKS[method]}" if method in SD3_BLOCKS else ALL_METHODS[method][1]


def method_blocks(method: str, arch: str) -> int | None:
    """K of the method's f: its K row's, else the tiny config's."""
    return SD3_BLOCKS.get(method, config_blocks(arch))


def beta_scale(base: Path, pairs_path: Path, blocks: list[int] = (), arch: str = "sd15",
               resolution: int = RESOLUTION, device: str = "cpu") -> dict:
    """1 / median |err_w - err_l| of the base on (up to) 64 training pairs, per space: beta x (error gap) is O(1) in
    both spaces (perceptual errors of the tiny U-Net are ~1e-5, latent ~1e-1). Transformers: "perceptual" at the
    tiny config's K, and "perceptual K=k" for each k in `blocks`. On `device` (the larger toy's forwards are
    minutes of one CPU thread)."""
    from ncp.conditioning import build_cond
    from ncp.config import EncoderConfig
    from ncp.data.config import DataConfig
    from ncp.data.loader import build_dataloader
    from ncp.models import load_models
    from ncp.objective import ObjectiveConfig, compute_objective, randomness_for

    models = configured(load_models(str(base), device=device), arch)
    family = models.family
    schedule = family.noise_process(models.scheduler, ObjectiveConfig()).to(device)
    k = config_blocks(arch)
    encoders = {"perceptual": family.encoder(models.unet, EncoderConfig(blocks=k, error="difference"))}
    encoders.update({f"perceptual K={k}": family.encoder(models.unet, EncoderConfig(blocks=k, error="difference"))
                     for k in blocks})
    loader = build_dataloader(DataConfig(source="pairs", path=str(pairs_path), resolution=resolution), 8, seed=0)
    g = torch.Generator().manual_seed(0)
    gaps = {**{k: [] for k in encoders}, "latent": []}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 8:
                break
            x0 = family.to_latents(models.vae, models.vae.encode(batch["pixel_values"].to(device)).latent_dist.mean)
            cond = build_cond(models, batch["prompts"])
            rnd = randomness_for(ObjectiveConfig(), schedule, len(batch["prompts"]), x0.shape[1:], g).to(device)
            for space in gaps:
                _, m = compute_objective(models.unet, encoders.get(space), schedule, x0, cond, rnd,
                                         ObjectiveConfig(loss="cpo", space=space.split(" ")[0], beta=1.0))
                gaps[space] += (m["err_w"] - m["err_l"]).abs().tolist()
    return {space: 1.0 / max(statistics.median(v), 1e-12) for space, v in gaps.items()}


def step_flops(base: Path, methods: list[str], arch: str, pairs: int, rank: int, resolution: int = 32) -> dict[str, int]:
    """FLOPs of one optimizer step's objective, forward and backward (torch.utils.flop_counter), per method, on
    `pairs` pairs with the run's LoRA: the denoiser's and f's work, which is what differs between methods. The VAE
    encoding of the pixels and the optimizer update, nearly the same for every method, are left out; precision
    does not change the count (a bf16 row counts as its fp32 twin with the same encoder.error). Counted on one
    pair and multiplied: FLOPs grow linearly with the batch, and the larger toy's 16 pairs would take minutes of
    one CPU thread."""
    from step_cost import count_flops  # benchmarks/step_cost.py

    from ncp.conditioning import build_cond
    from ncp.config import EncoderConfig
    from ncp.models import add_lora, load_models
    from ncp.objective import ObjectiveConfig, compute_objective, randomness_for

    models = configured(load_models(str(base)), arch)
    family = models.family
    schedule = family.noise_process(models.scheduler, ObjectiveConfig())
    kinds = {(method_blocks(m, arch), ALL_METHODS[m][3]) for m in methods}
    encoders = {(k, e): family.encoder(models.unet, EncoderConfig(blocks=k, error=e)) for k, e in kinds}  # before LoRA
    add_lora(models.unet, rank)
    models.unet.train()
    size = resolution // models.vae_scale_factor
    x0 = torch.randn(2, family.latent_channels(models.unet), size, size)
    cond = build_cond(models, ["a red circle on a white background"])
    rnd = randomness_for(ObjectiveConfig(), schedule, 1, x0.shape[1:], torch.Generator().manual_seed(0))
    flops = {}
    for m in methods:
        loss, space, _, error = ALL_METHODS[m]
        encoder = encoders[(method_blocks(m, arch), error)]
        step = lambda: compute_objective(models.unet, encoder, schedule, x0, cond, rnd,  # noqa: E731
                                         ObjectiveConfig(loss=loss, space=space, beta=1.0))[0].backward()
        flops[m] = pairs * count_flops(step)
    return flops


def run_name(method: str, steps: int, lr: float, beta_mult: float | None, seed: int) -> str:
    return f"{slug(method)}_{steps}steps_lr{lr:g}" + (f"_b{beta_mult:g}" if beta_mult is not None else "") + f"_s{seed}"


def job_common(arch: str, base, pairs_path, cfg: dict, device: str) -> dict:
    """What every run of a benchmark shares: base, pairs and the sizes of `cfg` (`train_and_score`'s job)."""
    return dict(arch=arch, base=str(base), pairs_path=str(pairs_path), device=device,
                **{k: cfg[k] for k in ("rank", "pairs", "steps", "eval_every", "sample_steps", "resolution")})


def make_job(common: dict, betas: dict, runs: Path, method: str, lr: float, mult: float | None, seed: int,
             prompts: list[str], img_seeds: list[int], score_steps: list[int]) -> dict:
    """One run for `train_and_score`, in runs/<run_name>: beta = the method's space scale x mult (SFT: no beta)."""
    sft = ALL_METHODS[method][0] == "sft"
    mult = None if sft else mult
    return dict(common, method=method, lr=lr, beta_mult=mult, beta=1.0 if sft else betas[space_key(method)] * mult,
                seed=seed, run_dir=str(runs / run_name(method, common["steps"], lr, mult, seed)), prompts=prompts,
                img_seeds=img_seeds, score_steps=score_steps)


def checkpoint_steps(cfg: dict) -> list[int]:
    """The steps whose checkpoints are scored on the test captions."""
    return list(range(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"]))


def trained(run_dir: Path) -> bool:
    """The run folder holds its final LoRA: the run is not trained again."""
    return (run_dir / "pytorch_lora_weights.safetensors").is_file()


def train_and_score(job: dict) -> dict:
    """One run: train it through the real script (unless its final LoRA exists), then score its checkpoints
    at job["score_steps"] on job["prompts"] x job["img_seeds"]. Runs in a worker process."""
    from accelerate.state import AcceleratorState

    from ncp.curves import run_loras
    from ncp.generate import load_pipeline, lora_loaded
    from ncp.metrics import read_metrics

    torch.set_num_threads(1)  # tiny models on a shared 2-core CPU: 1 thread per process is fastest
    loss, space, mp, error = ALL_METHODS[job["method"]]
    run_dir = Path(job["run_dir"])
    cache = run_dir / "scores.json"  # its checkpoints' scores, kept for a rerun (below)
    t_train = time.perf_counter()
    if not trained(run_dir):
        cache.unlink(missing_ok=True)  # scores of a run trained again are scores of new weights
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps a singleton per process
        argv = ["--config", str(ROOT / f"configs/tiny_{job.get('arch', 'sd15')}_ncp_{loss}.yaml"),
                f"model.pretrained={job['base']}", f"train.output_dir={run_dir}", "train.overwrite=true",
                f"objective.space={space}", f"objective.beta={job['beta']}", f"train.mixed_precision={mp}",
                f"encoder.error={error}", f"optim.lr={job['lr']}", "optim.scale_lr=false", "optim.warmup_steps=0",
                "optim.eps=1e-12",  # NCP-SFT's gradients are ~1e-8: Adam's eps must sit far below them
                f"lora.rank={job['rank']}", f"train.batch_size={job['pairs']}", f"train.max_steps={job['steps']}",
                f"train.checkpoint_every={job['eval_every']}", "train.keep_checkpoints=100000",
                "train.validate_every=0", "train.validation_prompts=[]", "train.report_to=none",
                f"train.seed={job['seed']}", "data.source=pairs", f"data.path={job['pairs_path']}",
                f"data.resolution={job['resolution']}"] + ([f"encoder.blocks={SD3_BLOCKS[job['method']]}"] if job["method"] in SD3_BLOCKS else [])
        importlib.import_module(f"train_ncp_{loss}").main(argv)
    t_score = time.perf_counter()
    rows = read_metrics(run_dir)
    seconds, total = {0: 0.0}, 0.0
    for r in rows:  # measured wall time between optimizer steps: loading, VAE encoding, objective, backward, update
        total += job["pairs"] / r["samples_per_s"]
        seconds[r["step"]] = total
    # scores are kept in the run folder per (prompts, image seeds, sampler): a rerun of a stopped benchmark repeats
    # neither the training nor the scoring of what it had finished
    kept = json.loads(cache.read_text()) if cache.is_file() else {}
    key = json.dumps([job["prompts"], job["img_seeds"], job["sample_steps"], BASE_GUIDANCE])
    scores = {int(s): v for s, v in kept.get(key, {}).items() if int(s) in job["score_steps"]}
    pipe = None
    with torch.no_grad():
        for step, lora in run_loras(run_dir):
            if step in job["score_steps"] and step not in scores:
                pipe = pipe or configured(load_pipeline(job["base"], job["device"]), job.get("arch", families.DEFAULT))
                with lora_loaded(pipe, lora):
                    scores[step] = score_images(pipe, job["prompts"], job["img_seeds"], job["sample_steps"],
                                                 guidance=BASE_GUIDANCE, resolution=job["resolution"]).tolist()
                kept[key] = {**kept.get(key, {}), str(step): scores[step]}
                (run_dir / "scores.tmp").write_text(json.dumps(kept))
                (run_dir / "scores.tmp").replace(cache)  # whole or not at all
    tail = rows[-max(1, len(rows) // 5):]  # the last 20% of steps
    head = rows[:max(1, len(rows) // 5)]
    mean = lambda rs, k: statistics.mean(r[k] for r in rs) if rs and k in rs[0] else None  # noqa: E731
    metrics = dict(implicit_acc=mean(tail, "implicit_acc"), err_w_first=mean(head, "err_w"), err_w_last=mean(tail, "err_w"),
                   err_l_first=mean(head, "err_l"), err_l_last=mean(tail, "err_l"), loss_last=mean(tail, "loss"))
    work = dict(train=t_score - t_train, score=time.perf_counter() - t_score)  # this job's wall seconds in its worker
    return dict(job, scores=scores, seconds={s: seconds.get(s) for s in job["score_steps"]}, metrics=metrics, work=work)


def run_jobs(jobs: list[dict], workers: int, log=print) -> list[dict]:
    """Jobs in `workers` processes (spawned: each imports torch afresh), or inline with 1 worker."""
    done = []
    if workers <= 1:
        for j in jobs:
            done.append(train_and_score(j))
            log(f"  {Path(j['run_dir']).name} done ({worked(done[-1])})")
        return done
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        try:
            for j, r in zip(jobs, pool.map(train_and_score, jobs)):
                done.append(r)
                log(f"  {Path(j['run_dir']).name} done ({worked(r)})")
        except BaseException:
            pool.shutdown(cancel_futures=True)  # a failed job ends the benchmark now, not after every queued job
            raise
    return done


def worked(result: dict) -> str:
    return f"training {result['work']['train']:.0f} s, scoring {result['work']['score']:.0f} s"


# ---------------------------------------------------------------- 2. the grid, extended past its edges
AXES = ("lr", "beta_mult")


def axis_edge(best: float | None, values: list) -> str | None:
    """'low' / 'high' where `best` is the smallest / largest of an axis's values (2 or more), else None (interior,
    or a one-value axis: a fixed setting, not a search)."""
    values = sorted(v for v in set(values) if v is not None)
    if best is None or len(values) < 2:
        return None
    return "low" if best == values[0] else "high" if best == values[-1] else None


def beyond(values: list, side: str) -> float:
    """The next value past an axis's `side` end, at the ratio of the two values nearest it (a log-spaced grid)."""
    v = sorted(set(values))
    return float(f"{(v[0] * v[0] / v[1] if side == 'low' else v[-1] * v[-1] / v[-2]):.3g}")


def best_run(cands: list[dict]) -> dict:
    """The highest validation reward at the last step; ties: the first tried (max keeps the first)."""
    return max(cands, key=lambda r: r["val_reward"])


def grid_status(cands: list[dict], extensions: dict, max_ext: int) -> dict:
    """Per axis: the values tried, where the best lies (None = interior / fixed), how often it was extended, and
    the extension due next (a value past the edge while extensions are left)."""
    best, status = best_run(cands), {}
    for axis in AXES:
        values = sorted({r[axis] for r in cands if r[axis] is not None})
        edge = axis_edge(best[axis], values)
        due = beyond(values, edge) if edge and extensions[axis] < max_ext else None
        status[axis] = dict(values=values, edge=edge, extensions=extensions[axis], next=due)
    return status


def grid_verdict(status: dict) -> str:
    """One phrase per method: interior, or on which edge after how many extensions."""
    words = [f"{axis} {s['edge']} edge after {s['extensions']} extension(s)" for axis, s in status.items() if s["edge"]]
    ext = sum(s["extensions"] for s in status.values())
    return "; ".join(words) if words else (f"interior after {ext} extension(s)" if ext else "interior")


def search_grid(first: list[dict], make_job, run, max_ext: int, log=print) -> tuple[dict, list[dict]]:
    """Run the grid's jobs, then, while a method's best lr or beta multiplier lies on an edge of the values tried,
    run one more value past that edge (at the best value of the other axis), at most max_ext times per axis.
    Returns ({method: its grid record}, every grid run)."""
    runs = run(first)
    extensions = {m: dict.fromkeys(AXES, 0) for m in dict.fromkeys(j["method"] for j in first)}
    while True:
        jobs = []
        for m, ext in extensions.items():
            cands = [r for r in runs if r["method"] == m]
            best, status = best_run(cands), grid_status(cands, ext, max_ext)
            for axis, s in status.items():
                if s["next"] is not None:
                    setting = {"lr": best["lr"], "beta_mult": best["beta_mult"], axis: s["next"]}
                    jobs.append(make_job(m, setting["lr"], setting["beta_mult"]))
                    ext[axis] += 1
                    log(f"grid {m}: best {axis} {best[axis]:g} on the {s['edge']} edge of {s['values']}: "
                        f"extended to {s['next']:g}")
        if not jobs:
            break
        runs += run(jobs)
    grids = {}
    for m, ext in extensions.items():
        cands = [r for r in runs if r["method"] == m]
        status = grid_status(cands, ext, max_ext)
        grids[m] = dict(best=best_run(cands), axes=status, verdict=grid_verdict(status))
    return grids, runs


# ---------------------------------------------------------------- 4. statistics

def at_cost(curve: dict[int, np.ndarray], cost: dict[int, float], c: float) -> np.ndarray:
    """Scores at cost c (training time, or FLOPs), linear between the checkpoints around it (curve and cost keyed by
    step); past the last checkpoint, its scores."""
    steps = sorted(curve)
    costs = [cost[s] for s in steps]
    for (s0, c0), (s1, c1) in zip(zip(steps, costs), zip(steps[1:], costs[1:])):
        if c0 <= c <= c1:
            w = (c - c0) / (c1 - c0) if c1 > c0 else 1.0
            return (1 - w) * curve[s0] + w * curve[s1]
    return curve[steps[-1]]


at_time = at_cost  # v2's name: the cost was the measured training time


def first_reach(steps: list[int], gains: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The first step at which a gain curve reaches `target`, linear between checkpoints; inf where it never does.
    gains (..., len(steps)) over `steps` (the first is step 0, gain 0); target (...)."""
    steps = np.asarray(steps, dtype=float)
    above = gains >= target[..., None]
    i = above.argmax(axis=-1)
    prev = np.maximum(i - 1, 0)
    g0, g1 = np.take_along_axis(gains, prev[..., None], -1)[..., 0], np.take_along_axis(gains, i[..., None], -1)[..., 0]
    w = np.where(g1 > g0, (target - g0) / np.where(g1 > g0, g1 - g0, 1.0), 1.0)
    step = np.where(i == 0, steps[0], steps[prev] + w * (steps[i] - steps[prev]))
    return np.where(above.any(axis=-1), step, np.inf)


def resample_counts(n: int, rng: np.random.Generator, boot: int = BOOT) -> np.ndarray:
    """(boot, n): how often each of n clusters is drawn in each bootstrap resample (with replacement)."""
    idx = rng.integers(0, n, size=(boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)


def learning_speed(gain_curves: dict[str, np.ndarray], steps: list[int], flops: dict[str, int],
                   rng: np.random.Generator) -> dict:
    """Steps (and FLOPs) to reach SPEED_FRACTIONS of the best method's final gain, per method.

    gain_curves: method -> (training seeds, prompts, len(steps)) gains over the base, each a prompt's mean over image
    seeds; steps starts at 0. The best method has the highest final mean gain. Intervals: 95% percentile bootstrap
    resampling prompts and training seeds together (the same draws for every method, and the target is recomputed
    in each resample from the best method's resampled final gain); a resample that never reaches counts as inf, so
    an upper bound can be "not reached"."""
    names = list(gain_curves)
    final = {m: float(g[..., -1].mean()) for m, g in gain_curves.items()}
    best = max(names, key=final.get)
    n_seeds, n_prompts = next(iter(gain_curves.values())).shape[:2]
    cs, cp = resample_counts(n_seeds, rng), resample_counts(n_prompts, rng)
    boot = {m: np.einsum("spk,bp,bs->bk", g, cp, cs) / (n_seeds * n_prompts) for m, g in gain_curves.items()}
    out = dict(best=best, best_final_gain=final[best], fractions={})
    for frac in SPEED_FRACTIONS:
        if final[best] <= 0:  # nothing gained: there is no target to reach
            out["fractions"][str(frac)] = None
            continue
        target, target_b = frac * final[best], frac * boot[best][:, -1]
        rows, points, draws = {}, {}, {}
        for m in names:
            points[m] = point = float(first_reach(steps, gain_curves[m].mean(axis=(0, 1)), np.array(target)))
            draws[m] = b = first_reach(steps, boot[m], target_b)
            lo, hi = (float(np.quantile(b, q, method="inverted_cdf")) for q in (0.025, 0.975))
            rows[m] = dict(steps=point, steps_low=lo, steps_high=hi, reached_share=float(np.isfinite(b).mean()),
                           flops=point * flops[m], flops_low=lo * flops[m], flops_high=hi * flops[m])
        ratios = {loss: step_ratio(points[n], points[lat], draws[n], draws[lat], flops[n] / flops[lat])
                  for loss, n, lat in PAIRS if n in names and lat in names}
        out["fractions"][str(frac)] = dict(target=target, methods=rows, ncp_over_latent=ratios)
    return out


def step_ratio(ncp: float, latent: float, ncp_b: np.ndarray, latent_b: np.ndarray, flop_ratio: float) -> dict:
    """NCP's steps to a target over latent's, paired (the same bootstrap resamples), and the same in FLOPs (times
    the per-step FLOP ratio): below 1, NCP gets there first. Only latent reaching gives inf, only NCP 0; a resample
    where neither reaches has no ratio (left out; `defined_share` says how many had one)."""
    def ratio(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.isinf(a) & np.isinf(b), np.nan, np.asarray(a, float) / np.asarray(b, float))

    point, b = float(ratio(ncp, latent)), ratio(ncp_b, latent_b)
    b = b[~np.isnan(b)]
    lo, hi = (float(np.quantile(b, q, method="inverted_cdf")) if len(b) else float("nan") for q in (0.025, 0.975))
    return dict(steps=point, steps_low=lo, steps_high=hi, flop_ratio=flop_ratio, defined_share=len(b) / len(ncp_b),
                ncp_first_share=float((b < 1).mean()) if len(b) else float("nan"))


def summarise(results: list[dict], base_scores: np.ndarray, chosen: dict, flops: dict[str, int], seed: int = 0) -> dict:
    """Per method: curves with intervals (by step and by FLOPs), gain over the base, metrics; learning speed; NCP vs
    latent at equal steps and at equal FLOPs."""
    rng = np.random.default_rng(seed)
    out, gain_curves = {}, {}
    for method in chosen:
        runs = sorted([r for r in results if r["method"] == method], key=lambda r: r["seed"])
        steps = sorted(int(s) for s in runs[0]["scores"])
        curve = {0: np.stack([base_scores] * len(runs))}
        curve.update({s: np.array([r["scores"][s] for r in runs]) for s in steps})
        seconds = {0: 0.0, **{s: statistics.mean(r["seconds"][s] for r in runs) for s in steps}}
        cost = {s: s * flops[method] for s in curve}
        points = []
        for s in sorted(curve):
            m, lo, hi = bootstrap(per_prompt(curve[s]), rng)
            g, glo, ghi = bootstrap(per_prompt(curve[s] - base_scores), rng)
            points.append(dict(step=s, flops=cost[s], seconds=seconds[s], reward=m, low=lo, high=hi, gain=g,
                               gain_low=glo, gain_high=ghi))
        last = steps[-1]
        per_seed = [float((np.array(r["scores"][last]) - base_scores).mean()) for r in runs]
        metrics = {k: statistics.mean(r["metrics"][k] for r in runs) if runs[0]["metrics"][k] is not None else None
                   for k in runs[0]["metrics"]}
        gain_curves[method] = np.stack([(curve[s] - base_scores).mean(axis=2) for s in sorted(curve)], axis=-1)
        out[method] = dict(setting=chosen[method], points=points, final=points[-1], gain_per_seed=per_seed,
                           flops_per_step=flops[method], seconds_per_step=seconds[last] / last, metrics=metrics,
                           curve=curve, cost=cost)
    speed = learning_speed(gain_curves, sorted(next(iter(out.values()))["curve"]), flops, rng)
    comparisons = []
    for loss, ncp, lat in PAIRS:
        if ncp not in out or lat not in out:
            continue
        a, b = out[ncp], out[lat]
        last = max(a["curve"])
        d_steps = bootstrap(per_prompt(a["curve"][last]) - per_prompt(b["curve"][last]), rng)
        f = min(a["cost"][last], b["cost"][max(b["curve"])])  # the cheaper run's whole training FLOPs
        ra, rb = at_cost(a["curve"], a["cost"], f), at_cost(b["curve"], b["cost"], f)
        comparisons.append(dict(loss=loss, ncp=ncp, latent=lat, step=last, equal_steps=d_steps, flops=f,
                                ncp_step=f / a["flops_per_step"], latent_step=f / b["flops_per_step"],
                                ncp_at_flops=bootstrap(per_prompt(ra - base_scores), rng),
                                latent_at_flops=bootstrap(per_prompt(rb - base_scores), rng),
                                equal_flops=bootstrap(per_prompt(ra) - per_prompt(rb), rng)))
    for m in out.values():  # arrays were for the comparisons; the JSON keeps the per-image scores in runs
        del m["curve"], m["cost"]
    return dict(methods=out, speed=speed, comparisons=comparisons)


# ---------------------------------------------------------------- outputs
def fmt(ci, digits: int = 4) -> str:
    m, lo, hi = ci
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def reach(v: float | None, scale: float = 1.0, digits: int = 0) -> str:
    """A step or FLOP count to a target; inf (in the JSON: null) is a target never reached."""
    return "not reached" if v is None or not np.isfinite(v) else f"{v / scale:.{digits}f}"


def ratio_text(v: float) -> str:
    """A step ratio: inf where only latent reaches the target, '-' where neither does."""
    return "-" if v is None or np.isnan(v) else "inf" if np.isinf(v) else f"{v:.2f}"


def ratio_ci(r: dict, scale: float = 1.0) -> str:
    """A step_ratio's point and 95% interval, times `scale` (its flop_ratio: the same in FLOPs)."""
    low, high = (ratio_text(r[k] * scale) for k in ("steps_low", "steps_high"))
    return f"{ratio_text(r['steps'] * scale)} [{low}, {high}]"


def jsonable(x):
    """The result with inf (a target never reached) as None: standard JSON."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return None if isinstance(x, float) and not np.isfinite(x) else x


def format_tables(result: dict) -> str:
    s = result["summary"]
    e = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    gf = 1e9
    lines = ["| method | lr | beta | grid | gain over base [95% CI] | per training seed | GFLOP/step | implicit acc | "
             "err_w first -> last | err_l first -> last |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in s["methods"].items():
        f, mt, st = m["final"], m["metrics"], m["setting"]
        lines.append(f"| {name} | {st['lr']:g} | {e(st['beta'])} | {st.get('grid', '-')} | "
                     f"{fmt((f['gain'], f['gain_low'], f['gain_high']))} | "
                     f"{', '.join(f'{g:+.4f}' for g in m['gain_per_seed'])} | {m['flops_per_step'] / gf:.4g} | "
                     f"{e(mt['implicit_acc'])} | {e(mt['err_w_first'])} -> {e(mt['err_w_last'])} | "
                     f"{e(mt['err_l_first'])} -> {e(mt['err_l_last'])} |")
    sp = s["speed"]
    lines += ["", f"Learning speed: steps and GFLOP to reach a share of the best method's final gain ({sp['best']}, "
                  f"{sp['best_final_gain']:+.4f}); [95% CI], share of bootstrap resamples that reach it", ""]
    fracs = [k for k, v in sp["fractions"].items() if v]
    if fracs:
        head = " | ".join(f"steps to {float(k):.0%} ({sp['fractions'][k]['target']:+.4f}) | GFLOP to {float(k):.0%}"
                          for k in fracs)
        lines += [f"| method | {head} |", "|---|" + "---|---|" * len(fracs)]
        for name in s["methods"]:
            cells = []
            for k in fracs:
                r = sp["fractions"][k]["methods"][name]
                cells += [f"{reach(r['steps'], digits=1)} [{reach(r['steps_low'], digits=1)}, "
                          f"{reach(r['steps_high'], digits=1)}] ({r['reached_share']:.0%})",
                          f"{reach(r['flops'], gf, 1)} [{reach(r['flops_low'], gf, 1)}, {reach(r['flops_high'], gf, 1)}]"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if any(sp["fractions"][k]["ncp_over_latent"] for k in fracs):
            lines += ["", "NCP's steps (and FLOPs) to the target over latent's, paired by resample: below 1, NCP gets "
                          "there first; [95% CI], share of NCP-first among the resamples where either gets there", "",
                      "| loss | " + " | ".join(f"steps to {float(k):.0%}, NCP / latent | FLOPs to {float(k):.0%}"
                                               for k in fracs) + " |", "|---|" + "---|---|" * len(fracs)]
            for loss in sp["fractions"][fracs[0]]["ncp_over_latent"]:
                cells = []
                for k in fracs:
                    r = sp["fractions"][k]["ncp_over_latent"][loss]
                    cells += [f"{ratio_ci(r)} ({r['ncp_first_share']:.0%})", ratio_ci(r, r["flop_ratio"])]
                lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    else:
        lines.append("No method gained over the base: no learning-speed target.")
    lines += ["", "| loss | NCP - latent at equal steps [95% CI] | equal FLOPs: GFLOP | NCP step | latent step | NCP gain | "
              "latent gain | NCP - latent [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    for c in s["comparisons"]:
        lines.append(f"| {c['loss']} | {fmt(c['equal_steps'])} (step {c['step']}) | {c['flops'] / gf:.4g} | "
                     f"{c['ncp_step']:.1f} | {c['latent_step']:.1f} | {fmt(c['ncp_at_flops'])} | "
                     f"{fmt(c['latent_at_flops'])} | {fmt(c['equal_flops'])} |")
    steps = sorted({p["step"] for m in s["methods"].values() for p in m["points"]})
    lines += ["", "| step | " + " | ".join(s["methods"]) + " |", "|---|" + "---|" * len(s["methods"])]
    for st in steps:
        cells = [next((f"{p['reward']:.4f} [{p['low']:.4f}, {p['high']:.4f}]" for p in m["points"] if p["step"] == st), "")
                 for m in s["methods"].values()]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    ref, b = result["reference"], result["base"]
    lines += ["", f"Test captions: chance {ref['chance']:.4f}, loser image {ref['loser']:.4f}, winner 1.0; VAE "
                  f"reconstruction of winners {b['vae_recon_reward']:.4f} (ceiling); base (EMA, step "
                  f"{b['unet_steps']}, stopped by {b['stopped_by']}) {result['base_test_reward']:.4f} "
                  f"on {result['test_images']} test images.", gap_closed(result), "", verdict(s)]
    return "\n".join(lines)


def gap_closed(result: dict) -> str:
    """The best method's final mean gain as a share of the room the base leaves: ceiling - base."""
    finals = {n: m["final"]["gain"] for n, m in result["summary"]["methods"].items()}
    best = max(finals, key=finals.get)
    room = result["base"]["vae_recon_reward"] - result["base_test_reward"]
    return (f"The best final gain ({best}, {finals[best]:+.4f}) closes {finals[best] / room:.0%} of the gap between the "
            f"base and the ceiling ({room:.4f}).")


def verdict(summary: dict) -> str:
    """The answers in words: who beats the base beyond its interval; NCP vs latent per loss at equal steps and
    equal FLOPs; who reaches 80% of the best gain in the fewest FLOPs."""
    up = [n for n, m in summary["methods"].items() if m["final"]["gain_low"] > 0]
    down = [n for n, m in summary["methods"].items() if m["final"]["gain_high"] < 0]
    lines = [f"Above the base by more than the 95% interval at the last step: {', '.join(up) or 'none'}; "
             f"below it: {', '.join(down) or 'none'}."]
    word = lambda ci: ("NCP higher" if ci[1] > 0 else "latent higher" if ci[2] < 0 else "no significant difference")  # noqa: E731
    fracs = {k: v["ncp_over_latent"] for k, v in summary["speed"]["fractions"].items() if v}
    for c in summary["comparisons"]:
        speed = "; ".join(f"steps to {float(k):.0%}, NCP / latent, {ratio_ci(r)}"
                          for k, rs in fracs.items() if (r := rs.get(c["loss"])))
        lines.append(f"{c['loss']}: equal steps {word(c['equal_steps'])} ({fmt(c['equal_steps'])}); equal FLOPs "
                     f"({c['flops'] / 1e9:.4g} GFLOP) {word(c['equal_flops'])} ({fmt(c['equal_flops'])})"
                     + (f"; {speed}." if speed else ".") + lr_caution(summary, c["ncp"], c["latent"]))
    top = summary["speed"]["fractions"].get(str(SPEED_FRACTIONS[-1]))
    if top:
        rows = {m: r for m, r in top["methods"].items() if np.isfinite(r["flops"])}
        fastest = min(rows, key=lambda m: rows[m]["flops"]) if rows else None
        lines.append(f"Fewest FLOPs to {SPEED_FRACTIONS[-1]:.0%} of the best final gain: {fastest or 'none reached it'}"
                     + (f" ({rows[fastest]['flops'] / 1e9:.4g} GFLOP, step {rows[fastest]['steps']:.1f})" if fastest else "")
                     + "; not reached: " + (", ".join(m for m in top["methods"] if m not in rows) or "none") + ".")
    return "\n".join(lines)


def lr_caution(summary: dict, ncp: str, latent: str) -> str:
    """Where the pair's chosen lrs differ, a gap between them may be the lrs' (the transformers' full runs had two
    such): the note says so and names the check that trains the latent method at NCP's lr."""
    a, b = (summary["methods"][m]["setting"]["lr"] for m in (ncp, latent))
    if a == b:
        return ""
    return (f" The two chose different lrs ({ncp} {a:g}, {latent} {b:g}): the gap may be the lrs'; "
            f"`python benchmarks/toy_lr_check.py --run OUT --method '{latent}' --lr {a:g} --out DIR` trains {latent} "
            f"at {ncp}'s lr and prints these tables with it in place.")


def plot(summary: dict, path: Path) -> None:
    """Gain over the base vs step and vs counted FLOPs, one line per method with its 95% band.

    Gains, not rewards: the band of a mean reward is mostly the spread between prompts, which every
    checkpoint shares; the gain is paired with the base image by image, as the table's intervals are."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, m in summary["methods"].items():
        style = "-" if name.startswith("NCP") else "--"
        for ax, x, scale in zip(axes, ("step", "flops"), (1, 1e9)):
            xs = [p[x] / scale for p in m["points"]]
            line, = ax.plot(xs, [p["gain"] for p in m["points"]], style, marker="o", ms=3, label=name)
            ax.fill_between(xs, [p["gain_low"] for p in m["points"]], [p["gain_high"] for p in m["points"]],
                            color=line.get_color(), alpha=0.12)
    axes[0].set_xlabel("optimizer step (equal steps)")
    axes[1].set_xlabel("counted GFLOP of the objective, forward + backward (equal compute)")
    axes[0].set_ylabel("toy reward gain over the base, test captions (95% band)")
    for ax in axes:
        ax.axhline(0, color="black", lw=0.8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rules(cfg: dict, split: dict, betas: dict | None = None) -> str:
    """The selection rules, fixed before any test prompt is scored."""
    text = [f"prompt split (seed {SPLIT_SEED}): {len(split['train'])} train / {len(split['val'])} validation / "
            f"{len(split['test'])} test captions, disjoint",
            f"base: EMA (decay {cfg['ema']}) checked every {cfg['base_check']} steps on the validation captions; "
            f"stop when the gain over the last two checks (step 0 never the earlier one) < {BASE_TOL}, "
            f"or at {cfg['base_max']} steps",
            f"grid (training seed 0, {cfg['steps']} steps, validation captions x {cfg['val_seeds']} image seeds, "
            f"highest mean reward at the last step): lr {cfg['lrs']}; beta multiplier {cfg['beta_mults']} for DPO/CPO"
            + (f" of {', '.join(f'{k} {v:.4g}' for k, v in betas.items())}" if betas else "")
            + f"; a best value on an edge of the values tried is extended one grid ratio past it, up to "
              f"{cfg['max_ext']} time(s) per axis, then reported as on the edge",
            "NCP-DPO bf16 difference / linearized (sd3: NCP-DPO K=2, K=4): NCP-DPO's chosen lr and beta multiplier",
            f"test: {cfg['seeds']} training seeds x {len(split['test'])} test captions x {cfg['img_seeds']} image "
            f"seeds; 95% bootstrap over prompts ({BOOT} resamples), a prompt's images one cluster",
            f"learning speed: steps (x counted FLOPs per step) to reach {', '.join(f'{f:.0%}' for f in SPEED_FRACTIONS)} "
            f"of the best method's final mean gain, linear between checkpoints; 95% bootstrap over prompts and "
            f"training seeds; equal FLOPs: at the cheaper method's total, the other interpolated between checkpoints"]
    return "\n".join("rule: " + t for t in text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toy-v2")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="shorter runs, a smaller grid (transformers: no K rows): 6-13 minutes on 2 CPU cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs, in seconds")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel processes, 1 torch thread each")
    p.add_argument("--methods", nargs="+", help="subset of the methods (default: every method of the arch)")
    p.add_argument("--arch", choices=list(DEFAULT_METHODS), default="sd15",
                   help="the base: tiny SD1.5 (U-Net, DDPM), tiny SD3 or tiny FLUX.1 dev (MMDiTs, flow matching)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: base, training and scoring on the GPU, at the larger toy's sizes (64 px, a 4x wider "
                        "denoiser, 16 pairs per step) unless --quick / --smoke is given")
    p.add_argument("--resolution", type=int, help="image side in px (default 32; the --device cuda toy's 64)")
    p.add_argument("--width", type=int, help="the denoiser this many times as wide (default 1; the cuda toy's 4)")
    p.add_argument("--dry-run", action="store_true", help="build the sized pipeline and count a step's FLOPs, no training")
    a = p.parse_args(argv)
    if a.device == "cuda" and not a.dry_run and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (--dry-run builds the larger toy and counts its FLOPs on the CPU)")
    a.methods = a.methods or (QUICK_METHODS if a.quick else DEFAULT_METHODS)[a.arch]
    unknown = set(a.methods) - set(ALL_METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {list(ALL_METHODS)}")
    cfg = dict(SMOKE if a.smoke else QUICK if a.quick else CUDA if a.device == "cuda" else FULL)
    for key, value in (("resolution", a.resolution), ("width", a.width)):
        if value is not None:
            cfg[key] = value
    if cfg["resolution"] % 8:
        p.error(f"--resolution must be a multiple of 8, got {cfg['resolution']}")
    if a.dry_run:
        torch.set_num_threads(1)
        return dry_run(Path(a.out), a.arch, cfg)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/toy_alignment.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")

    split = split_captions()
    print(rules(cfg, split))
    size, device = cfg["resolution"], a.device
    pairs_path = write_train_pairs(out, split["train"], cfg["num_pairs"], swap=BASE_DATA["swap"], size=size)
    val_seeds = list(range(1000, 1000 + cfg["val_seeds"]))  # grid selection
    check_seeds = base_check_seeds(cfg)
    test_seeds = list(range(cfg["img_seeds"]))
    base_key = {k: cfg[k] for k in ("vae_steps", "base_max", "base_check", "base_batch", "base_lr", "ema",
                                    "num_pairs", "val_seeds", "sample_steps")} | dict(BASE_DATA,
                                                                                       guidance=BASE_GUIDANCE)
    if a.arch != families.DEFAULT:  # the sd15 base's key stays as it was, so existing bases are reused
        base_key["arch"] = a.arch
    base_key.update(larger_size(cfg))  # a larger toy's base: its own key
    if model := toy_settings(a.arch):  # flux: the T5 length its prompts are encoded at
        base_key["model"] = model
    saved = out / "base.json"
    if saved.is_file() and json.loads(saved.read_text())["settings"] == base_key:  # the same rule gives the same base
        base = json.loads(saved.read_text())["base"]
        print(f"base: reusing {out / 'base'} (U-Net step {base['unet_steps']}, same settings)")
    else:
        shutil.rmtree(out / "runs", ignore_errors=True)  # runs of another base must not be reused below
        base = shipped_base(out, cfg, a.arch) or pretrain_base(out, cfg, split["val"], check_seeds, arch=a.arch, device=device,
                                                               **BASE_DATA, guidance=BASE_GUIDANCE)
        if "shipped" in base:
            print(f"base: the shipped toy base ({base['shipped']['file']}: these settings, stopped by the rule at "
                  f"step {base['unet_steps']})")
        saved.write_text(json.dumps(dict(settings=base_key, base=base), indent=2))
    base_dir = str(out / "base")
    betas = beta_scale(out / "base", pairs_path, [SD3_BLOCKS[m] for m in a.methods if m in SD3_BLOCKS], a.arch, size,
                       device)
    print("beta scale per space (1 / median |err_w - err_l| of the base): "
          + ", ".join(f"{k} {v:.4g}" for k, v in betas.items()))
    common = job_common(a.arch, base_dir, pairs_path, cfg, device)

    def job(method, lr, mult, seed, prompts, img_seeds, score_steps):
        return make_job(common, betas, out / "runs", method, lr, mult, seed, prompts, img_seeds, score_steps)

    # 2. grid on the validation captions
    from ncp.generate import load_pipeline

    t_grid = time.perf_counter()
    pipe_base = configured(load_pipeline(base_dir, device), a.arch)
    with torch.no_grad():
        base_val = float(score_images(pipe_base, split["val"], val_seeds, cfg["sample_steps"],
                                      guidance=BASE_GUIDANCE, resolution=size).mean())
    print(f"grid: the base's validation reward {base_val:.4f}")
    grid_jobs = [job(m, lr, mult, 0, split["val"], val_seeds, [cfg["steps"]])
                 for m in OBJECTIVES if m in a.methods or (m == "NCP-DPO" and any(x not in OBJECTIVES for x in a.methods))
                 for lr in cfg["lrs"] for mult in (cfg["beta_mults"] if ALL_METHODS[m][0] != "sft" else [1.0])]

    def run_grid(jobs):
        done = run_jobs(jobs, a.workers)
        for r in done:
            r["val_reward"] = float(np.mean(r["scores"][cfg["steps"]]))
            print(f"grid {r['method']}: lr {r['lr']:g}, beta x{r['beta_mult']}: validation reward {r['val_reward']:.4f}")
        return done

    grids, grid = search_grid(grid_jobs, lambda m, lr, mult: job(m, lr, mult, 0, split["val"], val_seeds, [cfg["steps"]]),
                              run_grid, cfg["max_ext"])
    chosen = {}
    for m, g in grids.items():
        best = g["best"]
        chosen[m] = dict(lr=best["lr"], beta_mult=best["beta_mult"], beta=best["beta"] if best["beta_mult"] else None,
                         val_reward=best["val_reward"], grid=g["verdict"], grid_axes=g["axes"])
    for m in a.methods:
        if "bf16" in m or m in SD3_BLOCKS:  # precision / K rows: NCP-DPO's setting, beta rescaled to their f
            chosen[m] = dict(chosen["NCP-DPO"], grid="NCP-DPO's setting")
            if m in SD3_BLOCKS:
                chosen[m]["beta"] = betas[space_key(m)] * chosen[m]["beta_mult"]
    chosen = {m: chosen[m] for m in ALL_METHODS if m in a.methods}
    print("chosen: " + "; ".join(f"{m} lr {c['lr']:g} beta x{c['beta_mult']} ({c['grid']})" for m, c in chosen.items()))
    grid_minutes = (time.perf_counter() - t_grid) / 60

    # 3. test: chosen settings, every training seed, every checkpoint (the grid's seed-0 runs are reused)
    t_test = time.perf_counter()
    score_steps = checkpoint_steps(cfg)
    with torch.no_grad():
        base_test = score_images(pipe_base, split["test"], test_seeds, cfg["sample_steps"], guidance=BASE_GUIDANCE,
                                 resolution=size)
    test_jobs = [job(m, c["lr"], c["beta_mult"] or 1.0, s, split["test"], test_seeds, score_steps)
                 for m, c in chosen.items() for s in range(cfg["seeds"])]
    # the longest first, so that no worker is left with a long run at the end: the jobs that train (not the grid's
    # seed-0 runs), by their method's training time in the grid (the rows never in it, as the precision rows, first)
    train_s = {r["method"]: r["work"]["train"] for r in grid}
    test_jobs.sort(key=lambda j: 0.0 if trained(Path(j["run_dir"])) else -train_s.get(j["method"], math.inf))
    test = run_jobs(test_jobs, a.workers)
    test_minutes = (time.perf_counter() - t_test) / 60

    flops = step_flops(out / "base", list(chosen), a.arch, cfg["pairs"], cfg["rank"], size)
    print("counted GFLOP per step (objective, forward + backward): "
          + ", ".join(f"{m} {f / 1e9:.4g}" for m, f in flops.items()))
    summary = summarise(test, base_test, chosen, flops)
    plot(summary, out / "curves.png")
    result = dict(command=command, setup=dict(cfg, arch=a.arch, device=device, guidance=BASE_GUIDANCE, base_tol=BASE_TOL,
                                              base_data=BASE_DATA, split_seed=SPLIT_SEED,
                                              workers=a.workers, methods=a.methods, beta_scale=betas),
                  rules=rules(cfg, split, betas), split=split, reference=reference_levels(split["test"], size=size), base=base,
                  base_val_reward=base_val, base_test_reward=float(base_test.mean()), test_images=int(base_test.size),
                  grid=[{k: r[k] for k in ("method", "lr", "beta_mult", "beta", "val_reward", "metrics")} for r in grid],
                  flops_per_step=flops,
                  chosen=chosen, summary=summary, base_test_scores=base_test.tolist(),
                  runs=[{k: r[k] for k in ("method", "seed", "lr", "beta", "run_dir", "scores", "seconds", "metrics", "work")}
                        for r in test],
                  minutes=dict(base=base["seconds"] / 60, grid=grid_minutes, test=test_minutes,
                               total=(time.perf_counter() - t0) / 60,
                               # worker minutes summed over the jobs (the walls above divide them among the workers)
                               worker_train=sum(r["work"]["train"] for r in grid + test) / 60,
                               worker_score=sum(r["work"]["score"] for r in grid + test) / 60))
    tables = format_tables(result)
    (out / "table.md").write_text(tables + "\n")
    (out / "toy_alignment.json").write_text(json.dumps(jsonable(result), indent=2))
    print(tables)
    mins = result["minutes"]
    print(f"total {mins['total']:.1f} min (base {mins['base']:.1f}, grid {grid_minutes:.1f}, test {test_minutes:.1f}; "
          f"worker minutes: training {mins['worker_train']:.1f}, scoring {mins['worker_score']:.1f}); "
          f"plot {out / 'curves.png'}, numbers {out / 'toy_alignment.json'}")
    return result


if __name__ == "__main__":
    main()
