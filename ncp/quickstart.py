"""The first run: NCP-DPO aligns a tiny model that has something to learn, and shows it (CPU, offline, minutes).

1. base: the toy base (`ncp.toy_base`: a tiny SD1.5 pretrained on toy shapes whose captions swap white and black
   backgrounds, so it paints a black background when asked for white and the other way round), written once to
   outputs/toy-sd15-base from the shipped weights;
2. pairs: toy preference pairs on the train captions only: winner = the caption drawn exactly, loser = the base's
   swapped background for white and black captions, one other attribute wrong for the rest (gray);
3. training: the normal entry point, `accelerate launch train_ncp_dpo.py --config configs/quickstart_ncp_dpo.yaml`;
4. results: the toy reward of the base and of every checkpoint on held-out test captions (the swapped backgrounds
   among them), with 95% intervals (bootstrap over prompts), chance and the ceiling, `reward_curve.png` and
   `before_after.png` (the same prompts and seeds, base and aligned). Images are sampled with classifier-free
   guidance BASE_GUIDANCE, so the base follows its (wrong) captions firmly. Training takes one core; this process
   scores the base and each finished checkpoint on another while it runs, and the final LoRA after it ends.

Each run writes a new folder, outputs/quickstart/<date-time>. Extra arguments are config overrides for step 3.

    python -m ncp.quickstart                      # what `bash scripts/quickstart.sh` runs after the setup
    python -m ncp.quickstart train.max_steps=20   # shorter
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ncp.errors import NcpError, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart_ncp_dpo.yaml"
BASE_DIR = Path("outputs/toy-sd15-base")
SEEDS = list(range(4))  # image seeds per held-out caption: 18 x 4 = 72 images per point (scoring is most of the time)
SHOW = dict(prompts=6, seeds=4, scale=3)  # before_after.png: first 6 test captions x 4 seeds, 32 px shown at 96


def new_run_dir(parent: Path) -> Path:
    """parent/<date-time>, or with -2, -3 ... when that exists: a rerun never replaces an earlier run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        out = parent / (stamp if i == 1 else f"{stamp}-{i}")
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            continue
    raise NcpError(f"{parent}: no free run folder for {stamp}")


def ensure_base(base: Path) -> Path:
    """The toy base pipeline folder, written from the shipped weights the first time."""
    from ncp.toy_base import write_base

    if not (base / "model_index.json").is_file():
        print(f"quickstart: writing the toy base (tiny SD1.5 pretrained on toy captions with white and black "
              f"backgrounds swapped) to {base}", flush=True)
        write_base(base)
    return base


def train_command(out: Path, base: Path, pairs: Path, overrides: list[str]) -> list[str]:
    """The normal training entry point on the quickstart's config, into out/run."""
    return ["accelerate", "launch", "-q", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", str(ROOT / "train_ncp_dpo.py"), "--config", str(CONFIG),
            f"model.pretrained={base}", f"data.path={pairs}", f"train.output_dir={out / 'run'}", *overrides]


def score_new(pipe, run: Path, scores: dict[int, np.ndarray], prompts: list[str], seeds: list[int], steps: int,
              finished: bool) -> None:
    """Add to `scores` ({step: toy reward (prompts, seeds)}) each LoRA of the run not scored yet, through the
    base pipeline `pipe`. Checkpoints are renamed into place whole, so they are scored while training runs; the
    final LoRA only once it has ended (`finished`), and not when a checkpoint of its step was (same weights)."""
    import torch

    from ncp.curves import run_loras
    from ncp.generate import lora_loaded
    from ncp.toy_base import BASE_GUIDANCE, score_images

    try:
        loras = run_loras(run)
    except NcpError:  # nothing written yet
        loras = []
    for step, lora in loras:
        if step in scores or (lora == run and not finished):
            continue
        with lora_loaded(pipe, lora), torch.no_grad():
            scores[step] = score_images(pipe, prompts, seeds, steps, guidance=BASE_GUIDANCE)


def summarise(scores: dict[int, np.ndarray]) -> list[dict]:
    """Per step: mean reward and gain over the base (paired image by image), each with its 95% bootstrap interval
    over prompts (a prompt's images are one cluster)."""
    from ncp.toy_base import bootstrap

    rng = np.random.default_rng(0)
    rows = []
    for step in sorted(scores):
        r = bootstrap(scores[step].mean(axis=1), rng)
        g = bootstrap((scores[step] - scores[0]).mean(axis=1), rng)
        rows.append(dict(step=step, reward=r[0], low=r[1], high=r[2], gain=g[0], gain_low=g[1], gain_high=g[2]))
    return rows


def table(rows: list[dict], n_prompts: int, n_seeds: int, levels: dict | None = None,
          by_swap: dict | None = None) -> str:
    """The results table; `levels`: chance and ceiling; `by_swap`: {"swapped" | "other": (captions, base mean,
    aligned mean)}, the rewards on the captions that name a value the base swaps and on the rest."""
    base, last = rows[0], rows[-1]
    verdict = ("the gain lies above its 95% interval's zero: the aligned model follows the captions better"
               if last["gain_low"] > 0 else "the gain's interval covers zero or lies below it: no clear gain in this run")
    notes = []
    if levels:
        notes.append(f"reference: chance (a random toy image) {levels['chance']:.4f}, ceiling (the exact image "
                     f"through the base's VAE) {levels['ceiling']:.4f}")
    if by_swap:
        named = dict(swapped="that the base draws swapped", other="that it draws as asked")
        notes.append("; ".join(f"{n} captions {named[k]}: {b:.4f} -> {a:.4f}" for k, (n, b, a) in by_swap.items() if n))
    return "\n".join([
        f"toy reward on {n_prompts} held-out captions x {n_seeds} seeds (1 = the caption drawn exactly; "
        f"95% bootstrap intervals over prompts)",
        "| model | step | toy reward [95% CI] | gain over base [95% CI] |", "|---|---|---|---|",
        f"| base | 0 | {base['reward']:.4f} [{base['low']:.4f}, {base['high']:.4f}] | |",
        f"| NCP-DPO | {last['step']} | {last['reward']:.4f} [{last['low']:.4f}, {last['high']:.4f}] | "
        f"{last['gain']:+.4f} [{last['gain_low']:+.4f}, {last['gain_high']:+.4f}] |", "", *notes, verdict])


def plot_curve(rows: list[dict], path: Path) -> None:
    """Toy reward against training step, with its 95% band (step 0 = the base)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [r["reward"] for r in rows], marker="o", label="NCP-DPO (step 0 = base)")
    ax.fill_between(steps, [r["low"] for r in rows], [r["high"] for r in rows], alpha=0.2, label="95% interval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("toy reward, held-out captions")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show(pipe, prompts: list[str], seeds: list[int], steps: int, lora: Path | None = None) -> list:
    """The images of every prompt at every seed (prompt-major), through `pipe`, with the LoRA in `lora` if given;
    `pipe` is left without it."""
    import torch

    from ncp.generate import lora_loaded, render
    from ncp.toy_base import BASE_GUIDANCE

    jobs = [(p, s) for p in prompts for s in seeds]
    with lora_loaded(pipe, lora), torch.no_grad():
        return render(pipe, [p for p, _ in jobs], [s for _, s in jobs], steps, BASE_GUIDANCE, 32)


def before_after(before: list, after: list, prompts: list[str], seeds: list[int], path: Path, scale: int = 3) -> Path:
    """One row per prompt: the base's images (`show` without a LoRA), then the aligned model's at the same seeds;
    labelled with the prompt and its mean toy reward, upscaled."""
    from PIL import Image, ImageDraw

    from ncp.data.toy import toy_reward

    cell, pad, label, gap, head = 32 * scale, 2, 290, 16, 24
    step = cell + pad
    grid = Image.new("RGB", (label + 2 * len(seeds) * step + gap, head + len(prompts) * step), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label, 6), "base", fill="black")
    draw.text((label + len(seeds) * step + gap, 6), "after NCP-DPO (same seeds)", fill="black")
    for i, prompt in enumerate(prompts):
        y, shown = head + i * step, slice(i * len(seeds), (i + 1) * len(seeds))
        rewards = [np.mean([toy_reward(img, prompt) for img in images[shown]]) for images in (before, after)]
        draw.text((6, y + cell // 2 - 12), prompt, fill="black")
        draw.text((6, y + cell // 2 + 4), f"toy reward {rewards[0]:.3f} -> {rewards[1]:.3f}", fill="gray")
        for k, images in enumerate((before, after)):
            for j, image in enumerate(images[shown]):
                grid.paste(image.resize((cell, cell), Image.NEAREST), (label + k * (len(seeds) * step + gap) + j * step, y))
    grid.save(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/quickstart", help="parent folder: each run writes <out>/<date-time>")
    p.add_argument("--base", default=str(BASE_DIR), help="toy base pipeline folder (written if missing)")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="image seeds per held-out caption")
    p.add_argument("--sample-steps", type=int, default=8, help="sampler steps per image")
    p.add_argument("overrides", nargs="*", help="config overrides for the training run, key.sub=value")
    a = p.parse_args(argv)
    import torch

    from ncp.toy_base import (BASE_DATA, BASE_GUIDANCE, reference_levels, score_images, split_captions, swapped,
                              write_train_pairs)

    # tiny models: one thread each; on a busy 2-core machine a second thread made a tiny U-Net forward 20x slower
    # (benchmarks/RESULTS.md, Machine), and a single one costs little on an idle one
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    out = new_run_dir(Path(a.out))
    base = ensure_base(Path(a.base))
    split = split_captions()
    swap = BASE_DATA["swap"]
    pairs = write_train_pairs(out, split["train"], 512, swap=swap)
    cmd = train_command(out, base, pairs, a.overrides)
    prompts, seeds = split["test"], list(range(a.seeds))
    print(f"quickstart: run folder {out}\nquickstart: training NCP-DPO on toy pairs of {len(split['train'])} train "
          f"captions:\n  {shlex.join(cmd)}\nquickstart: meanwhile scoring the base and each checkpoint on "
          f"{len(prompts)} held-out captions x {len(seeds)} seeds", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch` of this Python's env
    training = subprocess.Popen(launcher + cmd[2:], env=env)
    shown = dict(prompts=prompts[:SHOW["prompts"]], seeds=seeds[:SHOW["seeds"]], steps=a.sample_steps)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from ncp.generate import load_pipeline

    diffusers_logging.disable_progress_bar()  # the loading bars of this process would break the training's bar
    transformers_logging.disable_progress_bar()
    try:  # training takes one core; this process scores on the other while it runs: the base, then each checkpoint
        pipe = load_pipeline(str(base), "cpu")  # the base, loaded once
        scores = {0: score_images(pipe, prompts, seeds, a.sample_steps, guidance=BASE_GUIDANCE)}
        levels = reference_levels(prompts, pipe.vae)
        before = show(pipe, **shown)
        while training.poll() is None:
            score_new(pipe, out / "run", scores, prompts, seeds, a.sample_steps, finished=False)
            time.sleep(1)
    except BaseException as e:
        if training.poll() is None and not isinstance(e, KeyboardInterrupt):  # Ctrl-C reached the training too
            training.terminate()  # it saves a checkpoint and stops
        training.wait()
        raise
    if training.returncode != 0:
        raise SystemExit(1)  # the training command printed its own error
    t_train = time.perf_counter()
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")  # the held-out captions, for the next commands
    print("quickstart: training done; scoring the final LoRA", flush=True)
    score_new(pipe, out / "run", scores, prompts, seeds, a.sample_steps, finished=True)
    rows = summarise(scores)
    is_swapped = np.array([swapped(p, swap) is not None for p in prompts])
    by_swap = {k: (int(m.sum()), float(scores[0][m].mean()) if m.any() else 0.0,
                   float(scores[max(scores)][m].mean()) if m.any() else 0.0)
               for k, m in (("swapped", is_swapped), ("other", ~is_swapped))}
    text = table(rows, len(prompts), len(seeds), levels, by_swap)
    plot_curve(rows, out / "reward_curve.png")
    before_after(before, show(pipe, **shown, lora=out / "run"), shown["prompts"], shown["seeds"],
                 out / "before_after.png", SHOW["scale"])
    result = dict(command=shlex.join(cmd), rows=rows, prompts=prompts, seeds=seeds, levels=levels,
                  by_swap=by_swap, scores={str(k): v.tolist() for k, v in scores.items()},
                  seconds=dict(train=t_train - t0, total=time.perf_counter() - t0))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nquickstart: {out}/reward_curve.png (reward against step), {out}/before_after.png (the same prompts and "
          f"seeds, base and aligned), results.md / results.json; {time.perf_counter() - t0:.0f} s")
    print(next_steps(out, base))
    return result


def next_steps(out: Path, base: Path) -> str:
    from ncp.toy_base import BASE_GUIDANCE

    run = out / "run"
    return f"""
Next:
  tensorboard --logdir {run}/logs                   # loss, implicit accuracy, errors per step
  python -m ncp.generate --model {base} --lora {run} --prompts {out}/prompts.txt --seeds 0 1 --steps 8 --guidance {BASE_GUIDANCE:g} --resolution 32 --device cpu --out {out}/gen
  python -m ncp.evaluate --index {out}/gen/index.jsonl --reward toy --out {out}/eval   # win rate over the base
  accelerate launch -q --num_processes 4 train_ncp_dpo.py --config configs/sd15_ncp_dpo.yaml   # the paper's SD1.5 run, 4 GPUs
  accelerate launch -q --num_processes 4 train_ncp_dpo.py --config configs/sdxl_ncp_dpo.yaml   # SDXL
Every config: configs/; the guide: README.md and docs/."""


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
