"""Why does (or doesn't) preference training move a toy base? Small single-thread probes of one toy base folder
(the --out of benchmarks/toy_alignment.py: base/ and pairs/), used to diagnose the SD3 variant (RESULTS.md
section 4):

  base      pretrain the quick base of toy_alignment.py (`--arch`, QUICK sizes) and write its training pairs
  follow    does the base follow its captions? per attribute, the share of images whose best-scoring caption
            (that attribute varied, the others as captioned) is the caption itself; chance is 1/6, 1/3, 1/3
  sensitivity  how much the denoiser's output moves when one caption word is swapped, relative to dropping the
            caption, at three noise levels (16 toy latents)
  lora      the share of the denoiser's weights that the LoRA's target modules hold
  train     a LoRA trained with `compute_objective` directly (torch AdamW, the benchmark's eps and clip) from the
            base, printing every `--eval` steps: loss, implicit accuracy, gradient norm, |LoRA - its init|, the
            latent DPO margin on 64 held-out pairs with fixed noise, and the validation reward (base and tuned
            render the same seeds)

    python benchmarks/toy_diagnose.py base --arch sd3 --out outputs/toy-diag-sd3
    python benchmarks/toy_diagnose.py follow --out outputs/toy-diag-sd3
    python benchmarks/toy_diagnose.py train --out outputs/toy-diag-sd3 --space latent --beta 92.6 --lr 1e-3 --steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ncp.toy_base import base_check_seeds, pretrain_base, score_images, split_captions, write_train_pairs  # noqa: E402

VAL_SEEDS = 1000  # the grid's validation image seeds start here (toy_alignment.py)


def make_base(out: Path, arch: str) -> dict:
    """toy_alignment.py's quick base and its training pairs in out/."""
    from toy_alignment import QUICK

    split = split_captions()
    write_train_pairs(out, split["train"], QUICK["num_pairs"])
    return pretrain_base(out, QUICK, split["val"], base_check_seeds(QUICK), arch=arch)


def follow(base: Path, seeds: int = 8, steps: int = 8) -> dict:
    """Per attribute: the share of validation images whose best-scoring caption, that attribute varied, is theirs."""
    from ncp.data.toy import BACKGROUNDS, COLOURS, SHAPES, parse_caption, toy_caption, toy_reward
    from ncp.generate import load_pipeline, render
    from ncp.toy_base import GUIDANCE

    pipe = load_pipeline(str(base), "cpu")
    jobs = [(c, s) for c in split_captions()["val"] for s in range(VAL_SEEDS, VAL_SEEDS + seeds)]
    images = render(pipe, [c for c, _ in jobs], [s for _, s in jobs], steps, GUIDANCE, 32)
    hits = {"colour": [], "shape": [], "background": []}
    for img, (caption, _) in zip(images, jobs):
        c, s, b = parse_caption(caption)
        for key, alts, make, want in (("colour", COLOURS, lambda x: toy_caption(x, s, b), c),
                                      ("shape", SHAPES, lambda x: toy_caption(c, x, b), s),
                                      ("background", BACKGROUNDS, lambda x: toy_caption(c, s, x), b)):
            hits[key].append(max(alts, key=lambda x: toy_reward(img, make(x))) == want)
    return {**{k: float(np.mean(v)) for k, v in hits.items()},
            "reward": float(np.mean([toy_reward(i, c) for i, (c, _) in zip(images, jobs)]))}


def sensitivity(base: Path) -> list[str]:
    """||out(c') - out(c)|| / ||out(c) - out('')||, mean over 16 toy latents, c' = c with one attribute swapped."""
    import random

    from ncp.conditioning import build_cond
    from ncp.data.loader import to_tensor
    from ncp.data.toy import BACKGROUNDS, COLOURS, SHAPES, parse_caption, toy_caption, toy_pair
    from ncp.models import load_models
    from ncp.objective import ObjectiveConfig

    m = load_models(str(base))
    fam, rng, n = m.family, random.Random(0), 16
    schedule = fam.noise_process(m.scheduler, ObjectiveConfig())
    pairs = [toy_pair(5, i, 32) for i in range(n)]
    caps = [c for c, _, _ in pairs]
    lines = []
    with torch.no_grad():
        x0 = fam.to_latents(m.vae, m.vae.encode(torch.stack([to_tensor(w) for _, w, _ in pairs])).latent_dist.mean)

        def out(captions, x_t, t):
            return fam.denoise(m.unet, x_t, schedule.model_timestep(t), build_cond(m, captions).index(slice(0, n)))

        for frac in (0.2, 0.5, 0.8):
            t = torch.full((n,), int(frac * schedule.num_timesteps))
            x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
            base_out = out(caps, x_t, t)
            ref = (base_out - out([""] * n, x_t, t)).flatten(1).norm(dim=1)
            rel = {}
            for i, (key, values) in enumerate((("colour", COLOURS), ("shape", SHAPES), ("background", BACKGROUNDS))):
                alt = []
                for c in caps:
                    parts = list(parse_caption(c))
                    parts[i] = rng.choice([v for v in values if v != parts[i]])
                    alt.append(toy_caption(*parts))
                rel[key] = float(((out(alt, x_t, t) - base_out).flatten(1).norm(dim=1) / ref).mean())
            lines.append(f"{fam.name} t index {int(frac * schedule.num_timesteps)}: |out(caption) - out(empty)| "
                         f"{float(ref.mean()):.3g}; relative change when swapping "
                         + ", ".join(f"{k} {v:.3f}" for k, v in rel.items()))
    return lines


def lora_share(base: Path, rank: int) -> dict:
    """LoRA modules, LoRA parameters and the share of the denoiser's weights its target modules hold."""
    from ncp.models import add_lora, load_models

    unet = load_models(str(base)).unet
    total = sum(p.numel() for p in unet.parameters())
    lora = sum(p.numel() for p in add_lora(unet, rank=rank))
    targeted = [mod for mod in unet.modules() if hasattr(mod, "base_layer")]
    held = sum(p.numel() for mod in targeted for p in mod.base_layer.parameters())
    return dict(modules=len(targeted), lora_params=lora, share=held / total)


def train(a) -> None:
    from ncp.conditioning import build_cond
    from ncp.config import EncoderConfig
    from ncp.data.config import DataConfig
    from ncp.data.loader import build_dataloader
    from ncp.generate import load_pipeline
    from ncp.models import add_lora, load_models
    from ncp.objective import ObjectiveConfig, compute_objective, randomness_for

    torch.manual_seed(0)
    out = Path(a.out)
    models = load_models(str(out / "base"))
    fam = models.family
    ocfg = ObjectiveConfig(loss=a.loss, space=a.space, beta=a.beta)
    schedule = fam.noise_process(models.scheduler, ocfg)
    enc = fam.encoder(models.unet, EncoderConfig(blocks=a.blocks, error="difference"))
    params = add_lora(models.unet, rank=a.rank)
    models.unet.train()
    opt = torch.optim.AdamW(params, lr=a.lr, eps=1e-12, weight_decay=1e-2)  # eps as toy_alignment.py passes it
    pairs = str(out / "pairs" / "pairs.jsonl")

    def encode(batch):
        with torch.no_grad():
            x0 = fam.to_latents(models.vae, models.vae.encode(batch["pixel_values"]).latent_dist.mean)
        return x0, build_cond(models, batch["prompts"])

    held = encode(next(iter(build_dataloader(DataConfig(source="pairs", path=pairs), 64, seed=123))))
    rnd_held = randomness_for(ocfg, schedule, 64, held[0].shape[1:], torch.Generator().manual_seed(7))

    def margins() -> dict:
        """Latent DPO margin (ref gap - policy gap) and error changes on the held-out pairs, fixed noise."""
        models.unet.eval()
        with torch.no_grad():
            _, m = compute_objective(models.unet, enc, schedule, *held, rnd_held,
                                     ObjectiveConfig(loss="dpo", space="latent", beta=1.0))
        models.unet.train()
        margin = (m["ref_err_w"] - m["ref_err_l"]) - (m["err_w"] - m["err_l"])
        return dict(held_acc=float((margin > 0).float().mean()), held_margin=float(margin.mean()),
                    d_err_w=float((m["err_w"] - m["ref_err_w"]).mean()), d_err_l=float((m["err_l"] - m["ref_err_l"]).mean()),
                    median_gap=float((m["ref_err_w"] - m["ref_err_l"]).abs().median()))

    pipe = load_pipeline(str(out / "base"), "cpu")
    setattr(pipe, fam.denoiser_key, models.unet)  # renders with the LoRA as it trains
    val = split_captions()["val"]

    def reward() -> float:
        models.unet.eval()
        with torch.no_grad():
            r = float(score_images(pipe, val, list(range(VAL_SEEDS, VAL_SEEDS + a.seeds)), 8).mean())
        models.unet.train()
        return r

    print(json.dumps(vars(a)))
    r0 = reward()
    print(f"step 0 val reward {r0:.4f} {margins()}", flush=True)
    init = [p.detach().clone() for p in params]
    loader, g, hist, t0 = build_dataloader(DataConfig(source="pairs", path=pairs), a.pairs, seed=0), torch.Generator().manual_seed(0), [], time.time()
    it = iter(loader)
    for step in range(1, a.steps + 1):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x0, cond = encode(batch)
        rnd = randomness_for(ocfg, schedule, len(batch["prompts"]), x0.shape[1:], g)
        loss, m = compute_objective(models.unet, enc, schedule, x0, cond, rnd, ocfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(params, 1.0))  # the training scripts' optim.max_grad_norm
        opt.step()
        hist.append(dict(loss=float(loss.detach()), acc=float(m["implicit_acc"].mean()) if "implicit_acc" in m else 0.5, gn=gn))
        if step % a.eval == 0:
            moved = sum(float((p.detach() - p0).norm() ** 2) for p, p0 in zip(params, init)) ** 0.5
            last = hist[-a.eval:]
            r = reward()
            print(f"step {step} loss {statistics.mean(h['loss'] for h in last):.4f} acc {statistics.mean(h['acc'] for h in last):.3f} "
                  f"grad norm {statistics.mean(h['gn'] for h in last):.3g} |LoRA - init| {moved:.3g} val reward {r:.4f} "
                  f"(base {r0:.4f}, {r - r0:+.4f}) {margins()} {time.time() - t0:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=["base", "follow", "sensitivity", "lora", "train"])
    p.add_argument("--out", required=True, help="the toy folder: base/ and pairs/")
    p.add_argument("--arch", default="sd3", help="base: the tiny pipeline to pretrain")
    p.add_argument("--space", default="latent", choices=["latent", "perceptual"])
    p.add_argument("--loss", default="dpo", choices=["dpo", "cpo", "sft"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval", type=int, default=20, help="steps between probes")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--pairs", type=int, default=4, help="pairs per step")
    p.add_argument("--seeds", type=int, default=4, help="image seeds per validation caption")
    p.add_argument("--blocks", type=int, help="K of f (transformers; default the family's: a quarter of the blocks)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.probe == "base":
        print(make_base(Path(a.out), a.arch))
    elif a.probe == "follow":
        print(follow(Path(a.out) / "base"))
    elif a.probe == "sensitivity":
        print("\n".join(sensitivity(Path(a.out) / "base")))
    elif a.probe == "lora":
        print(lora_share(Path(a.out) / "base", a.rank))
    else:
        train(a)


if __name__ == "__main__":
    main()
