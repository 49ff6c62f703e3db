"""Toy alignment benchmark v2: does preference training raise a toy reward, and does NCP beat latent training
at equal optimizer steps and at equal compute? (the paper's Figure 3 and Table 1, in miniature, on a CPU)

Every selection rule below is fixed in code and printed (`rules()`) before any test prompt is scored.

0. Prompts. The toy captions ("a <colour> <shape> on a <background> background", 54 of them) are split once,
   by a seeded shuffle, into three disjoint sets: train captions (the preference pairs), validation captions
   (the base's stopping rule and the lr / beta choice) and test captions (every reported number).
1. Base. The tiny SD1.5 pipeline (ncp.tiny): its VAE trained as an autoencoder on toy images, then its U-Net
   with epsilon-MSE on winners' latents of every caption (a pretraining stream separate from the pairs; 10%
   empty captions; CAPTION_NOISE of the images show the loser instead, as web captions are noisy), with an EMA
   of the weights (diffusers' EMAModel). The EMA U-Net is scored on the
   validation captions every `base_check` steps; training stops at the first check where the reward gained
   less than BASE_TOL over the last two checks (it has stopped moving), or at `base_max` steps. The EMA
   weights at that check are the base.
2. Grid. Each of the six objectives (NCP / latent x DPO / CPO / SFT) trains with training seed 0 from the
   base for every lr in the grid (x every beta multiplier for DPO / CPO; beta = multiplier / median
   |err_w - err_l| of the base on the training pairs, per space). The setting with the highest mean
   validation reward at the last step wins (ties: the first in grid order). NCP-DPO under bf16 (difference
   and linearized error) takes NCP-DPO's chosen setting, so the precision rows differ in precision alone.
3. Test. Every method with its chosen setting trains with `seeds` training seeds (seed 0 is the grid's run)
   through the real scripts (`train_ncp_{dpo,cpo,sft}.main`), a checkpoint every `eval_every` steps. Each
   checkpoint and the base render every test caption x `img_seeds` image seeds, scored with `toy_reward`.
4. Statistics. 95% intervals: percentile bootstrap over test prompts (2000 resamples), one prompt's images
   (all image seeds, all training seeds) one cluster. Differences (NCP - latent) are paired by prompt.
   Equal steps: at the last step. Equal compute: at the training time of the cheaper method of a pair
   (wall time per step from metrics.jsonl, mean over seeds; runs in parallel workers share the CPU, so
   RESULTS.md also gives the comparison by counted FLOPs), the costlier one's scores interpolated
   linearly between its checkpoints.

Outputs in --out: toy_alignment.json (every number), curves.png (reward vs step and vs training time,
95% bands), table.md (the tables printed at the end), runs/ and base/.

    python benchmarks/toy_alignment.py --out outputs/toy-v2               # full: about 40 minutes, 2 workers
    python benchmarks/toy_alignment.py --quick --out outputs/toy-v2-quick # under 15 minutes, 2 workers
    python benchmarks/toy_alignment.py --smoke --out /tmp/toy-smoke       # seconds: the code runs

SD3 variant (--arch sd3): the same protocol on the tiny SD3 pipeline (MMDiT, flow matching): its own base
(VAE with SD3's shift and scale, then the transformer with velocity-MSE on logit-normal timesteps, with an
EMA, same stopping rule), the objectives in flow form, f = the first K joint blocks (configs/tiny_sd3_*.yaml:
K = 1 of 4), plus NCP-DPO with K = 2 and K = 4 (every block) at NCP-DPO's chosen setting, so those rows
differ in K alone; beta is scaled per space and per K. No bf16 rows (tests/test_sd3.py covers precision).

    python benchmarks/toy_alignment.py --arch sd3 --quick --workers 1 --out outputs/toy-sd3-quick

FLUX variant (--arch flux): the same on the tiny FLUX.1 dev pipeline (guidance 3.5, the training sigmas unshifted),
f = the first K double-stream blocks (configs/tiny_flux_*.yaml: K = 2 of 4), plus NCP-DPO with K = 1 and K = 4.

    python benchmarks/toy_alignment.py --arch flux --quick --workers 1 --out outputs/toy-flux-quick
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
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

from ncp import families  # noqa: E402
from ncp.data.toy import BACKGROUNDS, COLOURS, SHAPES, parse_caption, render, toy_reward  # noqa: E402
from ncp.toy_base import (BASE_TOL, BOOT, CAPTION_NOISE, GUIDANCE, SPLIT, SPLIT_SEED, base_check_seeds,  # noqa: E402,F401
                          bootstrap, per_prompt, pretrain_base, score_images, split_captions, write_train_pairs)

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
SD3_LRS = [1e-4, 3e-4]  # the sd3 variant's lr grid, one step lower than the U-Net's (chosen on validation captions)
DEFAULT_METHODS = {"sd15": list(METHODS), "sd3": OBJECTIVES + ["NCP-DPO K=2", "NCP-DPO K=4"],
                   "flux": OBJECTIVES + ["NCP-DPO K=1", "NCP-DPO K=4"]}
ARCH_LRS = {"sd3": SD3_LRS, "flux": SD3_LRS}  # lr grids that differ from the configuration's, by base
PAIRS = [("DPO", "NCP-DPO", "latent DPO"), ("CPO", "NCP-CPO", "latent CPO"), ("SFT", "NCP-SFT", "latent SFT")]

# Sizes. img_seeds x 18 test captions >= 256 test images per point (full, quick).
FULL = dict(vae_steps=200, base_max=1800, base_check=150, base_batch=16, base_lr=2e-3, ema=0.995,
            steps=80, eval_every=40, pairs=4, num_pairs=512, rank=8, seeds=3, img_seeds=15, val_seeds=8,
            lrs=[3e-4, 1e-3], beta_mults=[1.0, 4.0], sample_steps=8)
QUICK = dict(FULL, base_max=600, steps=40, eval_every=40, beta_mults=[1.0])
SMOKE = dict(vae_steps=3, base_max=4, base_check=2, base_batch=4, base_lr=2e-3, ema=0.9, steps=2, eval_every=1,
             pairs=2, num_pairs=8, rank=4, seeds=2, img_seeds=1, val_seeds=1, lrs=[5e-4], beta_mults=[1.0, 2.0],
             sample_steps=2)


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


# ---------------------------------------------------------------- 0. prompts and data

def reference_levels(prompts: list[str], size: int = 32) -> dict:
    """Toy reward of the exact image (1.0), a loser (one attribute wrong, as in the pairs) and chance
    (a random caption's image); means over `prompts`."""
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


# ---------------------------------------------------------------- scoring

# ---------------------------------------------------------------- 1. the base model

# ---------------------------------------------------------------- 2. beta scale, runs
def space_key(method: str) -> str:
    """Which beta scale a method uses: its space, and for the SD3 K rows the perceptual space of their f."""
    return f"perceptual K={SD3_BLOCKS[method]}" if method in SD3_BLOCKS else ALL_METHODS[method][1]


def beta_scale(base: Path, pairs_path: Path, blocks: list[int] = ()) -> dict:
    """1 / median |err_w - err_l| of the base on (up to) 64 training pairs, per space: beta x (error gap) is O(1) in
    both spaces (perceptual errors of the tiny U-Net are ~1e-5, latent ~1e-1). SD3: also per K in `blocks`."""
    from ncp.conditioning import build_cond
    from ncp.config import EncoderConfig
    from ncp.data.config import DataConfig
    from ncp.data.loader import build_dataloader
    from ncp.models import load_models
    from ncp.objective import ObjectiveConfig, compute_objective, randomness_for

    models = load_models(str(base))
    family = models.family
    schedule = family.noise_process(models.scheduler, ObjectiveConfig())
    # f at the tiny configs' K = 1 (an MMDiT's; a U-Net's f has no K), and at each K in `blocks` (sd3 only)
    encoders = {"perceptual": family.encoder(models.unet, EncoderConfig(blocks=1, error="difference"))}
    encoders.update({f"perceptual K={k}": family.encoder(models.unet, EncoderConfig(blocks=k, error="difference"))
                     for k in blocks})
    loader = build_dataloader(DataConfig(source="pairs", path=str(pairs_path)), 8, seed=0)
    g = torch.Generator().manual_seed(0)
    gaps = {**{k: [] for k in encoders}, "latent": []}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 8:
                break
            x0 = family.to_latents(models.vae, models.vae.encode(batch["pixel_values"]).latent_dist.mean)
            cond = build_cond(models, batch["prompts"])
            rnd = randomness_for(ObjectiveConfig(), schedule, len(batch["prompts"]), x0.shape[1:], g)
            for space in gaps:
                _, m = compute_objective(models.unet, encoders.get(space), schedule, x0, cond, rnd,
                                         ObjectiveConfig(loss="cpo", space=space.split(" ")[0], beta=1.0))
                gaps[space] += (m["err_w"] - m["err_l"]).abs().tolist()
    return {space: 1.0 / max(statistics.median(v), 1e-12) for space, v in gaps.items()}


def run_name(method: str, steps: int, lr: float, beta_mult: float | None, seed: int) -> str:
    return f"{slug(method)}_{steps}steps_lr{lr:g}" + (f"_b{beta_mult:g}" if beta_mult is not None else "") + f"_s{seed}"


def train_and_score(job: dict) -> dict:
    """One run: train it through the real script (unless its final LoRA exists), then score its checkpoints
    at job["score_steps"] on job["prompts"] x job["img_seeds"]. Runs in a worker process."""
    from accelerate.state import AcceleratorState

    from ncp.curves import run_loras
    from ncp.generate import load_pipeline
    from ncp.metrics import read_metrics

    torch.set_num_threads(1)  # tiny models on a shared 2-core CPU: 1 thread per process is fastest
    loss, space, mp, error = ALL_METHODS[job["method"]]
    run_dir = Path(job["run_dir"])
    if not (run_dir / "pytorch_lora_weights.safetensors").is_file():
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
                "data.resolution=32"] + ([f"encoder.blocks={SD3_BLOCKS[job['method']]}"] if job["method"] in SD3_BLOCKS else [])
        importlib.import_module(f"train_ncp_{loss}").main(argv)
    rows = read_metrics(run_dir)
    seconds, total = {0: 0.0}, 0.0
    for r in rows:  # measured wall time between optimizer steps: loading, VAE encoding, objective, backward, update
        total += job["pairs"] / r["samples_per_s"]
        seconds[r["step"]] = total
    pipe = load_pipeline(job["base"], "cpu")
    scores = {}
    with torch.no_grad():
        for step, lora in run_loras(run_dir):
            if step in job["score_steps"]:
                pipe.load_lora_weights(str(lora), adapter_name="ncp_curve")
                try:
                    scores[step] = score_images(pipe, job["prompts"], job["img_seeds"], job["sample_steps"]).tolist()
                finally:
                    pipe.unload_lora_weights()
    tail = rows[-max(1, len(rows) // 5):]  # the last 20% of steps
    head = rows[:max(1, len(rows) // 5)]
    mean = lambda rs, k: statistics.mean(r[k] for r in rs) if rs and k in rs[0] else None  # noqa: E731
    metrics = dict(implicit_acc=mean(tail, "implicit_acc"), err_w_first=mean(head, "err_w"), err_w_last=mean(tail, "err_w"),
                   err_l_first=mean(head, "err_l"), err_l_last=mean(tail, "err_l"), loss_last=mean(tail, "loss"))
    return dict(job, scores=scores, seconds={s: seconds.get(s) for s in job["score_steps"]}, metrics=metrics)


def run_jobs(jobs: list[dict], workers: int, log=print) -> list[dict]:
    """Jobs in `workers` processes (spawned: each imports torch afresh), or inline with 1 worker."""
    done = []
    if workers <= 1:
        for j in jobs:
            done.append(train_and_score(j))
            log(f"  {Path(j['run_dir']).name} done")
        return done
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for j, r in zip(jobs, pool.map(train_and_score, jobs)):
            done.append(r)
            log(f"  {Path(j['run_dir']).name} done")
    return done


# ---------------------------------------------------------------- 4. statistics

def at_time(curve: dict[int, np.ndarray], seconds: dict[int, float], t: float) -> np.ndarray:
    """Scores at training time t, linear between the checkpoints around it (curve and seconds keyed by step)."""
    steps = sorted(curve)
    times = [seconds[s] for s in steps]
    for (s0, t0), (s1, t1) in zip(zip(steps, times), zip(steps[1:], times[1:])):
        if t0 <= t <= t1:
            w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
            return (1 - w) * curve[s0] + w * curve[s1]
    return curve[steps[-1]]


def summarise(results: list[dict], base_scores: np.ndarray, chosen: dict, seed: int = 0) -> dict:
    """Per method: curves with intervals, gain over the base, training times, metrics; NCP vs latent comparisons."""
    rng = np.random.default_rng(seed)
    out = {}
    for method in chosen:
        runs = sorted([r for r in results if r["method"] == method], key=lambda r: r["seed"])
        steps = sorted(int(s) for s in runs[0]["scores"])
        curve = {0: np.stack([base_scores] * len(runs))}
        curve.update({s: np.array([r["scores"][s] for r in runs]) for s in steps})
        seconds = {0: 0.0, **{s: statistics.mean(r["seconds"][s] for r in runs) for s in steps}}
        points = []
        for s in sorted(curve):
            m, lo, hi = bootstrap(per_prompt(curve[s]), rng)
            g, glo, ghi = bootstrap(per_prompt(curve[s] - base_scores), rng)
            points.append(dict(step=s, seconds=seconds[s], reward=m, low=lo, high=hi, gain=g, gain_low=glo, gain_high=ghi))
        last = steps[-1]
        per_seed = [float((np.array(r["scores"][last]) - base_scores).mean()) for r in runs]
        metrics = {k: statistics.mean(r["metrics"][k] for r in runs) if runs[0]["metrics"][k] is not None else None
                   for k in runs[0]["metrics"]}
        out[method] = dict(setting=chosen[method], points=points, final=points[-1], gain_per_seed=per_seed,
                           seconds_per_step=seconds[last] / last, metrics=metrics, curve=curve, seconds=seconds)
    comparisons = []
    for loss, ncp, lat in PAIRS:
        if ncp not in out or lat not in out:
            continue
        a, b = out[ncp], out[lat]
        last = max(a["curve"])
        d_steps = bootstrap(per_prompt(a["curve"][last]) - per_prompt(b["curve"][last]), rng)
        t = min(a["seconds"][last], b["seconds"][max(b["curve"])])  # the cheaper run's whole training time
        ra, rb = at_time(a["curve"], a["seconds"], t), at_time(b["curve"], b["seconds"], t)
        d_time = bootstrap(per_prompt(ra) - per_prompt(rb), rng)
        comparisons.append(dict(loss=loss, ncp=ncp, latent=lat, step=last, equal_steps=d_steps, seconds=t,
                                ncp_at_seconds=bootstrap(per_prompt(ra - base_scores), rng),
                                latent_at_seconds=bootstrap(per_prompt(rb - base_scores), rng), equal_compute=d_time))
    for m in out.values():  # arrays were for the comparisons; the JSON keeps the per-image scores in runs
        del m["curve"], m["seconds"]
    return dict(methods=out, comparisons=comparisons)


# ---------------------------------------------------------------- outputs
def fmt(ci, digits: int = 4) -> str:
    m, lo, hi = ci
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def format_tables(result: dict) -> str:
    s = result["summary"]
    lines = ["| method | lr | beta | gain over base [95% CI] | per training seed | s/step | implicit acc | "
             "err_w first -> last | err_l first -> last |", "|---|---|---|---|---|---|---|---|---|"]
    e = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    for name, m in s["methods"].items():
        f, mt, st = m["final"], m["metrics"], m["setting"]
        lines.append(f"| {name} | {st['lr']:g} | {e(st['beta'])} | {fmt((f['gain'], f['gain_low'], f['gain_high']))} | "
                     f"{', '.join(f'{g:+.4f}' for g in m['gain_per_seed'])} | {m['seconds_per_step']:.3f} | "
                     f"{e(mt['implicit_acc'])} | {e(mt['err_w_first'])} -> {e(mt['err_w_last'])} | "
                     f"{e(mt['err_l_first'])} -> {e(mt['err_l_last'])} |")
    lines += ["", "| loss | NCP - latent at equal steps [95% CI] | equal compute: seconds | NCP gain | latent gain | "
              "NCP - latent [95% CI] |", "|---|---|---|---|---|---|"]
    for c in s["comparisons"]:
        lines.append(f"| {c['loss']} | {fmt(c['equal_steps'])} (step {c['step']}) | {c['seconds']:.1f} | "
                     f"{fmt(c['ncp_at_seconds'])} | {fmt(c['latent_at_seconds'])} | {fmt(c['equal_compute'])} |")
    steps = sorted({p["step"] for m in s["methods"].values() for p in m["points"]})
    lines += ["", "| step | " + " | ".join(s["methods"]) + " |", "|---|" + "---|" * len(s["methods"])]
    for st in steps:
        cells = [next((f"{p['reward']:.4f} [{p['low']:.4f}, {p['high']:.4f}]" for p in m["points"] if p["step"] == st), "")
                 for m in s["methods"].values()]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    ref, b = result["reference"], result["base"]
    lines += ["", f"Test captions: chance {ref['chance']:.4f}, loser image {ref['loser']:.4f}, winner 1.0; VAE "
                  f"reconstruction of winners {b['vae_recon_reward']:.4f} (ceiling); base (EMA, U-Net step "
                  f"{b['unet_steps']}, stopped by {b['stopped_by']}) {result['base_test_reward']:.4f} "
                  f"on {result['test_images']} test images.", "", verdict(s)]
    return "\n".join(lines)


def verdict(summary: dict) -> str:
    """The two answers in words: who beats the base beyond its interval; NCP vs latent per loss, both budgets."""
    up = [n for n, m in summary["methods"].items() if m["final"]["gain_low"] > 0]
    down = [n for n, m in summary["methods"].items() if m["final"]["gain_high"] < 0]
    lines = [f"Above the base by more than the 95% interval at the last step: {', '.join(up) or 'none'}; "
             f"below it: {', '.join(down) or 'none'}."]
    word = lambda ci: ("NCP higher" if ci[1] > 0 else "latent higher" if ci[2] < 0 else "no significant difference")  # noqa: E731
    for c in summary["comparisons"]:
        lines.append(f"{c['loss']}: equal steps {word(c['equal_steps'])} ({fmt(c['equal_steps'])}); equal compute "
                     f"({c['seconds']:.0f} s of training) {word(c['equal_compute'])} ({fmt(c['equal_compute'])}).")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Gain over the base vs step and vs measured training time, one line per method with its 95% band.

    Gains, not rewards: the band of a mean reward is mostly the spread between prompts, which every
    checkpoint shares; the gain is paired with the base image by image, as the table's intervals are."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, m in summary["methods"].items():
        style = "-" if name.startswith("NCP") else "--"
        for ax, x in zip(axes, ("step", "seconds")):
            xs = [p[x] for p in m["points"]]
            line, = ax.plot(xs, [p["gain"] for p in m["points"]], style, marker="o", ms=3, label=name)
            ax.fill_between(xs, [p["gain_low"] for p in m["points"]], [p["gain_high"] for p in m["points"]],
                            color=line.get_color(), alpha=0.12)
    axes[0].set_xlabel("optimizer step (equal steps)")
    axes[1].set_xlabel("measured training time, s (equal compute)")
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
            f"stop when the gain over the last two checks < {BASE_TOL}, or at {cfg['base_max']} steps",
            f"grid (training seed 0, {cfg['steps']} steps, validation captions x {cfg['val_seeds']} image seeds, "
            f"highest mean reward at the last step): lr {cfg['lrs']}; beta multiplier {cfg['beta_mults']} for DPO/CPO"
            + (f" of {', '.join(f'{k} {v:.4g}' for k, v in betas.items())}" if betas else ""),
            "NCP-DPO bf16 difference / linearized (sd3: NCP-DPO K=2, K=4): NCP-DPO's chosen lr and beta multiplier",
            f"test: {cfg['seeds']} training seeds x {len(split['test'])} test captions x {cfg['img_seeds']} image "
            f"seeds; 95% bootstrap over prompts ({BOOT} resamples), a prompt's images one cluster"]
    return "\n".join("rule: " + t for t in text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toy-v2")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter base and runs, a smaller grid: under 15 minutes")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs, in seconds")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel processes, 1 torch thread each")
    p.add_argument("--methods", nargs="+", help="subset of the methods (default: every method of the arch)")
    p.add_argument("--arch", choices=list(DEFAULT_METHODS), default="sd15",
                   help="the base: tiny SD1.5 (U-Net, DDPM), tiny SD3 or tiny FLUX.1 dev (MMDiTs, flow matching)")
    a = p.parse_args(argv)
    a.methods = a.methods or DEFAULT_METHODS[a.arch]
    unknown = set(a.methods) - set(ALL_METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {list(ALL_METHODS)}")
    cfg = dict(SMOKE if a.smoke else QUICK if a.quick else FULL)
    if not a.smoke:  # RESULTS.md section 4: on the sd3 base every method at lr 3e-4 (the U-Net grid's lowest) fell
        cfg["lrs"] = ARCH_LRS.get(a.arch, cfg["lrs"])  # below the base on the validation captions
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/toy_alignment.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}")

    split = split_captions()
    print(rules(cfg, split))
    pairs_path = write_train_pairs(out, split["train"], cfg["num_pairs"])
    val_seeds = list(range(1000, 1000 + cfg["val_seeds"]))  # grid selection
    check_seeds = base_check_seeds(cfg)
    test_seeds = list(range(cfg["img_seeds"]))
    base_key = {k: cfg[k] for k in ("vae_steps", "base_max", "base_check", "base_batch", "base_lr", "ema",
                                    "num_pairs", "val_seeds", "sample_steps")} | dict(caption_noise=CAPTION_NOISE)
    if a.arch != families.DEFAULT:  # the sd15 base's key stays as it was, so existing bases are reused
        base_key["arch"] = a.arch
    saved = out / "base.json"
    if saved.is_file() and json.loads(saved.read_text())["settings"] == base_key:  # the same rule gives the same base
        base = json.loads(saved.read_text())["base"]
        print(f"base: reusing {out / 'base'} (U-Net step {base['unet_steps']}, same settings)")
    else:
        shutil.rmtree(out / "runs", ignore_errors=True)  # runs of another base must not be reused below
        base = pretrain_base(out, cfg, split["val"], check_seeds, arch=a.arch)
        saved.write_text(json.dumps(dict(settings=base_key, base=base), indent=2))
    base_dir = str(out / "base")
    betas = beta_scale(out / "base", pairs_path, [SD3_BLOCKS[m] for m in a.methods if m in SD3_BLOCKS])
    print(f"beta scale per space (1 / median |err_w - err_l| of the base): "
          + ", ".join(f"{k} {v:.4g}" for k, v in betas.items()))
    common = dict(arch=a.arch, base=base_dir, pairs_path=str(pairs_path), rank=cfg["rank"], pairs=cfg["pairs"], steps=cfg["steps"],
                  eval_every=cfg["eval_every"], sample_steps=cfg["sample_steps"])

    def job(method, lr, mult, seed, prompts, img_seeds, score_steps):
        space, loss = ALL_METHODS[method][1], ALL_METHODS[method][0]
        beta = betas[space_key(method)] * mult if loss != "sft" else 1.0
        return dict(common, method=method, lr=lr, beta_mult=mult if loss != "sft" else None, beta=beta, seed=seed,
                    run_dir=str(out / "runs" / run_name(method, cfg["steps"], lr, mult if loss != "sft" else None, seed)),
                    prompts=prompts, img_seeds=img_seeds, score_steps=score_steps)

    # 2. grid on the validation captions
    from ncp.generate import load_pipeline

    t_grid = time.perf_counter()
    pipe_base = load_pipeline(base_dir, "cpu")
    with torch.no_grad():
        base_val = float(score_images(pipe_base, split["val"], val_seeds, cfg["sample_steps"]).mean())
    print(f"grid: the base's validation reward {base_val:.4f}")
    grid_jobs = [job(m, lr, mult, 0, split["val"], val_seeds, [cfg["steps"]])
                 for m in OBJECTIVES if m in a.methods or (m == "NCP-DPO" and any(x not in OBJECTIVES for x in a.methods))
                 for lr in cfg["lrs"] for mult in (cfg["beta_mults"] if ALL_METHODS[m][0] != "sft" else [1.0])]
    grid = run_jobs(grid_jobs, a.workers)
    chosen = {}
    for m in dict.fromkeys(j["method"] for j in grid_jobs):
        cands = [r for r in grid if r["method"] == m]
        for r in cands:
            r["val_reward"] = float(np.mean(r["scores"][cfg["steps"]]))
            print(f"grid {m}: lr {r['lr']:g}, beta x{r['beta_mult']}: validation reward {r['val_reward']:.4f}")
        best = max(cands, key=lambda r: r["val_reward"])  # max keeps the first of equal ones
        chosen[m] = dict(lr=best["lr"], beta_mult=best["beta_mult"], beta=best["beta"] if best["beta_mult"] else None,
                         val_reward=best["val_reward"])
    for m in a.methods:
        if "bf16" in m or m in SD3_BLOCKS:  # precision / K rows: NCP-DPO's setting, beta rescaled to their f
            chosen[m] = dict(chosen["NCP-DPO"])
            if m in SD3_BLOCKS:
                chosen[m]["beta"] = betas[space_key(m)] * chosen[m]["beta_mult"]
    chosen = {m: chosen[m] for m in ALL_METHODS if m in a.methods}
    print("chosen: " + "; ".join(f"{m} lr {c['lr']:g} beta x{c['beta_mult']}" for m, c in chosen.items()))
    grid_minutes = (time.perf_counter() - t_grid) / 60

    # 3. test: chosen settings, every training seed, every checkpoint (the grid's seed-0 runs are reused)
    t_test = time.perf_counter()
    score_steps = list(range(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"]))
    with torch.no_grad():
        base_test = score_images(pipe_base, split["test"], test_seeds, cfg["sample_steps"])
    test_jobs = [job(m, c["lr"], c["beta_mult"] or 1.0, s, split["test"], test_seeds, score_steps)
                 for m, c in chosen.items() for s in range(cfg["seeds"])]
    test = run_jobs(test_jobs, a.workers)
    test_minutes = (time.perf_counter() - t_test) / 60

    summary = summarise(test, base_test, chosen)
    plot(summary, out / "curves.png")
    result = dict(command=command, setup=dict(cfg, guidance=GUIDANCE, base_tol=BASE_TOL, caption_noise=CAPTION_NOISE, split_seed=SPLIT_SEED,
                                              workers=a.workers, methods=a.methods, beta_scale=betas),
                  rules=rules(cfg, split, betas), split=split, reference=reference_levels(split["test"]), base=base,
                  base_val_reward=base_val, base_test_reward=float(base_test.mean()), test_images=int(base_test.size),
                  grid=[{k: r[k] for k in ("method", "lr", "beta_mult", "beta", "val_reward", "metrics")} for r in grid],
                  chosen=chosen, summary=summary, base_test_scores=base_test.tolist(),
                  runs=[{k: r[k] for k in ("method", "seed", "lr", "beta", "run_dir", "scores", "seconds", "metrics")}
                        for r in test],
                  minutes=dict(base=base["seconds"] / 60, grid=grid_minutes, test=test_minutes,
                               total=(time.perf_counter() - t0) / 60))
    tables = format_tables(result)
    (out / "table.md").write_text(tables + "\n")
    (out / "toy_alignment.json").write_text(json.dumps(result, indent=2))
    print(tables)
    print(f"total {result['minutes']['total']:.1f} min (base {result['minutes']['base']:.1f}, grid {grid_minutes:.1f}, "
          f"test {test_minutes:.1f}); plot {out / 'curves.png'}, numbers {out / 'toy_alignment.json'}")
    return result


if __name__ == "__main__":
    main()
