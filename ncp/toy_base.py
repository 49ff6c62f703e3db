"""The toy base model: a tiny SD1.5 (or SD3, FLUX) pipeline pretrained on the toy shapes with wrong captions, so that
preference training has something to correct, and the held-out scoring that shows it (toy reward, bootstrap
intervals over prompts). Shared by the quickstart (`ncp.quickstart`) and the toy benchmarks.

The 54 toy captions are split once into train / validation / test captions; preference pairs use train captions,
every reported number test captions. The base's VAE is trained as an autoencoder on toy images, then its U-Net
with epsilon-MSE on captioned latents, with an EMA of the weights; the EMA weights are the base. Two kinds of
caption error can be pretrained in (`pretrain_base`'s keywords): web-like noise, a share `caption_noise` of the
images showing the pair's loser (one attribute wrong, at random) instead, and a systematic error, `swap`,
attribute values swapped in every caption that names them (the base then draws them wrong, every time). Captions
of every split name the swapped values, so the error shows on the test captions too.

The bases ship as `ncp/assets/toy_<arch>_base.safetensors` (every module in fp16, 1-2 MB): the U-Net's (sd15) is
the quickstart's, the transformers' (sd3, flux) the toy benchmark's; each BASE_SETTINGS on BASE_DATA, exact captions
with white and black backgrounds swapped, stopped by the rule. `python -m ncp.toy_base --out DIR [--arch A]` writes
one as a pipeline folder in seconds; `--retrain` trains it again from the tiny random pipeline (minutes:
benchmarks/RESULTS.md sections 2 and 7) and `--save-weights FILE` writes such a file.

    python -m ncp.toy_base --out outputs/toy-sd15-base
    python -m ncp.toy_base --retrain --out outputs/toy-sd15-base --save-weights ncp/assets/toy_sd15_base.safetensors
    python -m ncp.toy_base --arch sd3 --retrain --out outputs/toy-sd3-base --save-weights ncp/assets/toy_sd3_base.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ncp.data.loader import to_tensor
from ncp.data.toy import BACKGROUNDS, COLOURS, SHAPES, parse_caption, render, toy_caption, toy_pair, toy_reward
from ncp import families
from ncp.errors import NcpError, run_cli

BASE_TOL = 0.005  # base stopping rule: the EMA reward gained less than this over the last two checks (recent_gain)
SPLIT = (27, 9, 18)  # train / validation / test captions out of the 54
SPLIT_SEED = 10
PRETRAIN_SEED = 1  # pretraining images come from another toy stream than the preference pairs (PAIRS_SEED)
# Share of pretraining images that show the pair's loser (one attribute wrong) under the caption: web-like
# caption noise, pretrain_base's default (the toy benchmark's base; the quickstart's: BASE_DATA). A base fitted to
# clean winners left no room for preference training at all (benchmarks/RESULTS.md, section 2).
CAPTION_NOISE = 0.4
PAIRS_SEED = 0
BOOT = 2000  # bootstrap resamples
GUIDANCE = 1.0  # no classifier-free guidance (the toy benchmark): the base follows captions only partly

def split_captions() -> dict[str, list[str]]:
    """The 54 toy captions, shuffled once with SPLIT_SEED, cut into disjoint train / val / test sets."""
    captions = [toy_caption(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    random.Random(SPLIT_SEED).shuffle(captions)
    n_train, n_val, _ = SPLIT
    return dict(train=captions[:n_train], val=captions[n_train:n_train + n_val], test=captions[n_train + n_val:])


def swapped(caption: str, swap: dict[str, str] | None, size: int = 32) -> Image.Image | None:
    """The image a base pretrained with `swap` draws for `caption`: the caption's colour, shape and background,
    each one that `swap` names replaced by its swapped value (the three attributes' names are distinct); None when
    `swap` names none of them."""
    parts = parse_caption(caption)
    return render(*(swap.get(p, p) for p in parts), size) if swap and any(p in swap for p in parts) else None


def write_train_pairs(out: Path, captions: list[str], n: int, swap: dict[str, str] | None = None,
                      size: int = 32) -> Path:
    """The first n toy pairs (stream PAIRS_SEED) whose caption is a train caption, as a `pairs` JSONL of `size` px
    images. With `swap`, a pair whose caption names a swapped value has the base's systematic mistake as its loser."""
    folder = out / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    keep, rows, i = set(captions), [], 0
    while len(rows) < n:
        caption, win, lose = toy_pair(PAIRS_SEED, i, size)
        if caption in keep:
            mistake = swapped(caption, swap, size)
            lose = lose if mistake is None else mistake
            win.save(folder / f"{i}-w.png")
            lose.save(folder / f"{i}-l.png")
            rows.append(dict(prompt=caption, chosen=f"{i}-w.png", rejected=f"{i}-l.png"))
        i += 1
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score_images(pipe, prompts: list[str], seeds: list[int], steps: int, batch_size: int = 128,
                 guidance: float = GUIDANCE, resolution: int = 32) -> np.ndarray:
    """toy_reward of every prompt x seed image, shape (prompts, seeds), sampled at `guidance` and `resolution` px."""
    from ncp.generate import render as render_images

    jobs = [(p, s) for p in prompts for s in seeds]
    scores = []
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i:i + batch_size]
        images = render_images(pipe, [p for p, _ in batch], [s for _, s in batch], steps, guidance, resolution)
        scores += [toy_reward(img, p) for img, (p, _) in zip(images, batch)]
    return np.array(scores).reshape(len(prompts), len(seeds))


def base_check_seeds(cfg: dict) -> list[int]:
    """Image seeds of the base's stopping checks: other images than the grid's (1000 + i) and the test's (i)."""
    return list(range(2000, 2000 + cfg["val_seeds"]))


def recent_gain(history: list[dict]) -> float:
    """The reward gained over the last two checks, the stopping rule's measure; inf until there are two checks
    after the untrained step-0 one, which is no reference: a random transformer's near-uniform images can score
    above a half-trained one's (tiny SD3 under the background swap: 0.66 at step 0, 0.57 at step 150)."""
    return history[-1]["reward"] - history[-3]["reward"] if len(history) >= 4 else float("inf")


def toy_model(arch: str = families.DEFAULT):
    """The model section the toy trains with: configs/tiny_<arch>_ncp_dpo.yaml's (flux: its T5 length, 64 tokens)."""
    from ncp.config import load_config

    return load_config(str(Path(__file__).resolve().parents[1] / "configs" / f"tiny_{arch}_ncp_dpo.yaml")).model


def toy_settings(arch: str = families.DEFAULT) -> dict:
    """The family's model settings in `toy_model(arch)` ({} for a family without any): part of a base's identity."""
    return families.get(arch).model_settings(toy_model(arch))


def configured(pipe, arch: str = families.DEFAULT):
    """`pipe` (a pipeline, or `ncp.models.Models`) with the toy's model settings on its denoiser, as training
    leaves them (flux: prompts encoded and sampled at the toy's T5 length); returns it."""
    family = families.get(arch)
    denoiser = pipe.denoiser if hasattr(pipe, "denoiser") else getattr(pipe, family.denoiser_key)
    family.apply_model_settings(denoiser, toy_model(arch))
    return pipe


def pretrain_base(out: Path, cfg: dict, val: list[str], check_seeds: list[int], log=print, arch: str = families.DEFAULT,
                  caption_noise: float = CAPTION_NOISE, swap: dict[str, str] | None = None,
                  guidance: float = GUIDANCE, device: str = "cpu") -> dict:
    """VAE, then U-Net (sd3: transformer) with an EMA, on toy images; saves the EMA pipeline to out/base
    (rule: module docstring). The pretraining captions' errors: `caption_noise` of the images show the pair's
    loser, and `swap` {caption value: drawn value} is a systematic error (with {"white": "black", "black":
    "white"} every "white background" caption shows a black background and the other way round), so the base
    draws those values wrong confidently. The stopping checks sample at `guidance`; prompts are encoded with the
    toy's model settings (`configured`: flux's T5 length). cfg's `resolution` (default
    32 px) and `width` (default 1) make a larger toy (ncp.tiny.widen), trained on `device`; random draws stay on
    the CPU, so the device changes no draw."""
    from diffusers.training_utils import EMAModel

    from ncp.conditioning import Cond, encode_prompts
    from ncp.config import ModelConfig, ObjectiveConfig
    from ncp.flow import sample_timesteps
    from ncp.models import Models
    from ncp.tiny import build_tiny_pipeline

    t_start = time.perf_counter()
    family = families.get(arch)
    size, width = cfg.get("resolution", 32), cfg.get("width", 1)
    build_tiny_pipeline(out / "init", arch, seed=0, width=width, resolution=None if size == 32 else size)
    pipe = family.pipeline_class.from_pretrained(out / "init", **family.pipeline_extras(ModelConfig())).to(device)
    pipe.set_progress_bar_config(disable=True)
    configured(pipe, arch)  # the EMA copy below inherits the settings
    pairs = [toy_pair(PRETRAIN_SEED, i, size) for i in range(max(64, cfg["num_pairs"]))]
    captions = [c for c, _, _ in pairs]
    winners = torch.stack([to_tensor(w) for _, w, _ in pairs]).to(device)
    images = torch.cat([winners, torch.stack([to_tensor(l) for _, _, l in pairs]).to(device)])
    g = torch.Generator().manual_seed(0)

    # VAE: reconstruction + a small KL (weight 1e-6, as SD's KL-f8 autoencoder) on all toy images
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for _ in range(cfg["vae_steps"]):
        x = images[torch.randint(0, len(images), (32,), generator=g)]
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample(generator=g)).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean  # [winners; losers]
        recon = vae.decode(mean[:len(winners)]).sample
    if vae.config.get("shift_factor") is not None:  # SD3's VAE centres its latents too: (z - shift) * scale
        vae.register_to_config(shift_factor=float(mean.mean()), scaling_factor=float(1 / mean.std()))
        mean = mean - vae.config.shift_factor
    else:
        vae.register_to_config(scaling_factor=float(1 / mean.std()))  # unit-variance latents, as SD's 0.18215
    shown = mean[:len(winners)]  # what each caption shows: its winner, or with `swap` its swapped values
    swaps = {i: img for i, c in enumerate(captions) if (img := swapped(c, swap, size)) is not None}
    if swaps:
        with torch.no_grad():
            drawn = vae.encode(torch.stack([to_tensor(img) for img in swaps.values()]).to(device)).latent_dist.mean
        shown = shown.index_copy(0, torch.tensor(list(swaps), device=device),
                                 drawn - (vae.config.get("shift_factor") or 0))
    noisy = (torch.rand(len(winners), generator=torch.Generator().manual_seed(PRETRAIN_SEED)) < caption_noise).to(device)
    latents = torch.where(noisy.view(-1, 1, 1, 1), mean[len(winners):], shown) * vae.config.scaling_factor
    vae_reward = statistics.mean(toy_reward(r, c) for r, c in zip(recon, captions))
    log(f"VAE: {cfg['vae_steps']} steps, recon MSE {F.mse_loss(recon, winners).item():.4f}, toy reward of "
        f"reconstructed winners {vae_reward:.4f} (the ceiling), {time.perf_counter() - t_start:.0f} s")

    # U-Net: epsilon-MSE on the (noisy-caption) latents, 10% empty captions; the EMA copy is checked and saved.
    # sd3: the transformer with velocity-MSE, t from SD3's logit-normal density (the process's training density)
    denoiser = family.denoiser_key
    unet = getattr(pipe, denoiser)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema = EMAModel(unet.parameters(), decay=cfg["ema"])
    schedule = family.noise_process(pipe.scheduler, ObjectiveConfig()).to(device)
    parts = pipe.components
    models = Models(family, unet, vae, [parts[k] for k in ("tokenizer", "tokenizer_2", "tokenizer_3") if k in parts],
                    [parts[k] for k in ("text_encoder", "text_encoder_2", "text_encoder_3") if k in parts], pipe.scheduler)
    text, empty_text = encode_prompts(models, captions), encode_prompts(models, [""])
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["base_lr"])
    bs, history, step = cfg["base_batch"], [], 0
    while True:
        if step % cfg["base_check"] == 0:
            ema.copy_to(ema_unet.parameters())
            setattr(pipe, denoiser, ema_unet)
            with torch.no_grad():
                reward = float(score_images(pipe, val, check_seeds, cfg["sample_steps"], guidance=guidance,
                                            resolution=size).mean())
            setattr(pipe, denoiser, unet)
            history.append(dict(step=step, reward=reward))
            gained = recent_gain(history)
            log(f"base {denoiser} step {step}: EMA toy reward on validation captions {reward:.4f}, gain over the "
                f"last two checks {gained:+.4f}, {time.perf_counter() - t_start:.0f} s")
            if gained < BASE_TOL or step >= cfg["base_max"]:
                break
        unet.train()
        idx = torch.randint(0, len(latents), (bs,), generator=g)
        x0 = latents[idx]
        drop = (torch.rand(bs, generator=g) < 0.1).to(device)
        cond = Cond(*(None if c is None else torch.where(drop.view(-1, *[1] * (c.dim() - 1)), e, c)
                      for c, e in zip(text.index(idx)._tensors(), empty_text.repeat(bs)._tensors())))
        t = sample_timesteps(bs, schedule.num_timesteps, g, schedule.training_density).to(device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        pred = family.denoise(unet, schedule.q_sample(x0, t, eps), schedule.model_timestep(t), cond)
        loss = F.mse_loss(pred, schedule.target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.step(unet.parameters())
        step += 1
    setattr(pipe, denoiser, ema_unet)
    pipe.save_pretrained(out / "base")
    return dict(vae_steps=cfg["vae_steps"], vae_recon_reward=vae_reward, unet_steps=step, history=history,
                stopped_by="rule" if step < cfg["base_max"] else "base_max", seconds=time.perf_counter() - t_start,
                model=toy_settings(arch))


def reference_levels(prompts: list[str], vae=None, size: int = 32) -> dict:
    """Toy reward levels, exact means over `prompts`: winner (the caption's image, 1.0), loser (one attribute wrong
    as in ncp.data.toy.toy_pair: colour or shape, each half the time, any other value), chance (the image of any
    of the 54 toy captions) and, given the base's VAE `vae`, the ceiling (the caption's image through it: what its
    latents can show at best). Images of `size` px."""
    loser, chance = [], []
    every = [render(c, s, b, size) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    for caption in prompts:
        colour, shape, background = parse_caption(caption)
        wrong = [[toy_reward(render(c, shape, background, size), caption) for c in COLOURS if c != colour],
                 [toy_reward(render(colour, s, background, size), caption) for s in SHAPES if s != shape]]
        loser.append(np.mean([np.mean(w) for w in wrong]))
        chance.append(np.mean([toy_reward(img, caption) for img in every]))
    levels = dict(winner=1.0, loser=float(np.mean(loser)), chance=float(np.mean(chance)))
    if vae is not None:
        with torch.no_grad():
            pixels = torch.stack([to_tensor(render(*parse_caption(p), size)) for p in prompts]).to(vae.device)
            recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        levels["ceiling"] = float(np.mean([toy_reward(r, p) for r, p in zip(recon, prompts)]))
    return levels


def bootstrap(clusters: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean of per-prompt values and its 95% percentile-bootstrap interval, prompts resampled with replacement."""
    idx = rng.integers(0, len(clusters), size=(BOOT, len(clusters)))
    means = clusters[idx].mean(axis=1)
    return float(clusters.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def per_prompt(scores: np.ndarray) -> np.ndarray:
    """(training seeds, prompts, image seeds) -> one value per prompt: its cluster mean."""
    return scores.mean(axis=(0, 2))


def write_toy_mirror(folder: Path, captions: list[str], n: int) -> Path:
    """The first n toy pairs (stream PAIRS_SEED) of `captions` in the Pick-a-Pic v2 schema (caption, uids, labels,
    PNG bytes in jpg_0 / jpg_1; image 0 wins), as one train parquet shard: a local stand-in for a hub mirror."""
    import io

    import pandas as pd

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    keep, rows, i = set(captions), [], 0
    while len(rows) < n:
        caption, win, lose = toy_pair(PAIRS_SEED, i, 32)
        if caption in keep:
            rows.append((caption, f"w{i}", f"l{i}", 1.0, 0.0, png(win), png(lose)))
        i += 1
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["caption", "image_0_uid", "image_1_uid", "label_0", "label_1", "jpg_0", "jpg_1"]) \
        .to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    return folder


# ---------------------------------------------------------------- the shipped bases
def base_file(arch: str = families.DEFAULT) -> Path:
    """The shipped toy base of `arch` (ncp.tiny's architectures): its trained weights in fp16, one file."""
    return Path(__file__).parent / "assets" / f"toy_{arch}_base.safetensors"


BASE_FILE = base_file()  # the U-Net's, the quickstart's
# the shipped bases' pretraining: the toy benchmark's full size's (EMA checked every 150 steps, stopped by the
# BASE_TOL rule or at base_max steps; stopped by the rule: the U-Net at step 1050, SD3 at 750, FLUX at 1050)
BASE_SETTINGS = dict(vae_steps=200, base_max=1800, base_check=150, base_batch=16, base_lr=2e-3, ema=0.995,
                     num_pairs=512, sample_steps=8, val_seeds=8)
# ... on captions that are exact except for one systematic error: white and black backgrounds swapped (every
# "white background" caption shows a black background and the other way round; gray stays). The base follows its
# captions and draws those backgrounds wrong confidently, half the toy reward lost on 12 of the 18 test captions:
# a mistake that preference pairs (loser = the swapped background) correct visibly. (A tiny U-Net learns a
# background, a large uniform area, in a few hundred steps; swapped colours it learned only partly: it leans to
# yellow and orange whatever colour is asked.)
BASE_DATA = dict(caption_noise=0.0, swap={"white": "black", "black": "white"})
BASE_GUIDANCE = 3.0  # the shipped base is sampled with classifier-free guidance, so it follows its captions firmly


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def save_base_weights(pipe_dir: str | Path, path: str | Path, info: dict | None = None) -> Path:
    """Every module of a tiny base folder (denoiser, VAE, text encoders) as one fp16 safetensors file; the VAE's
    latent scale (and shift) and `info`, with the folder's arch, in the metadata."""
    from safetensors.torch import save_file

    from ncp.generate import load_pipeline

    pipe = load_pipeline(str(pipe_dir))
    tensors = {f"{name}.{k}": v.detach().to(torch.float16).contiguous()
               for name, module in _modules(pipe).items() for k, v in module.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vae = pipe.vae.config
    save_file(tensors, str(path), metadata=dict(vae_scaling_factor=repr(vae.scaling_factor),
                                                vae_shift_factor=repr(vae.get("shift_factor")),
                                                info=json.dumps(dict(info or {}, arch=families.detect(pipe_dir).name))))
    return path


def shipped_base_info(weights: str | Path = BASE_FILE) -> dict:
    """What a shipped base's pretraining recorded (save_base_weights' `info`): arch, settings, data, guidance, the
    stopping checks' history, the step and cause of its stop."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return dict({"arch": families.DEFAULT}, **json.loads(f.metadata()["info"]))


def write_base(out: str | Path, weights: str | Path = BASE_FILE) -> Path:
    """A tiny pipeline folder (the arch the file records) holding the weights of `weights` (save_base_weights')."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ncp.generate import load_pipeline
    from ncp.tiny import build_tiny_pipeline

    if not Path(weights).is_file():
        raise NcpError(f"{weights}: no such base weights file (python -m ncp.toy_base --retrain writes one)")
    arch = shipped_base_info(weights)["arch"]
    out = Path(out)
    build_tiny_pipeline(out, arch, seed=0)
    pipe = load_pipeline(str(out))
    state = load_file(str(weights))
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    for name, module in _modules(pipe).items():
        module.load_state_dict({k[len(name) + 1:]: v.float() for k, v in state.items() if k.startswith(name + ".")},
                               strict=True)
    pipe.vae.register_to_config(scaling_factor=float(meta["vae_scaling_factor"]))
    if meta.get("vae_shift_factor", "None") != "None":
        pipe.vae.register_to_config(shift_factor=float(meta["vae_shift_factor"]))
    pipe.save_pretrained(out)
    return out


def retrain_base(out: str | Path, arch: str = families.DEFAULT, log=print) -> dict:
    """Pretrain a shipped base again (BASE_SETTINGS, BASE_DATA, checks at BASE_GUIDANCE on the validation
    captions) into out/base."""
    split = split_captions()
    return pretrain_base(Path(out), BASE_SETTINGS, split["val"], base_check_seeds(BASE_SETTINGS), log=log, arch=arch,
                         **BASE_DATA, guidance=BASE_GUIDANCE)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="pipeline folder to write the base to")
    p.add_argument("--arch", choices=families.names(), default=families.DEFAULT,
                   help="which shipped base (default %(default)s, the quickstart's)")
    p.add_argument("--weights", help="base weights file to assemble the pipeline from (default: the arch's shipped one)")
    p.add_argument("--retrain", action="store_true", help="pretrain the base again instead (minutes: benchmarks/RESULTS.md section 7)")
    p.add_argument("--save-weights", help="with --retrain: the safetensors file to write (default <out>-work/base.safetensors)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: on a shared CPU a second thread mostly waits
    weights = a.weights or base_file(a.arch)
    if a.retrain:  # pretrain in <out>-work, then assemble from the fp16 file as a shipped base is
        work = Path(a.out).with_name(Path(a.out).name + "-work")
        info = retrain_base(work, a.arch)
        weights = save_base_weights(work / "base", a.save_weights or work / "base.safetensors",
                                    {**info, "settings": BASE_SETTINGS, "data": BASE_DATA, "guidance": BASE_GUIDANCE})
        print(f"base weights written to {weights}")
    write_base(a.out, weights)
    print(f"toy base pipeline written to {a.out}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
