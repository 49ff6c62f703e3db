"""Reward vs training step for one or several runs (the paper's Figure 3).

Every checkpoint LoRA of each run, its final LoRA and step 0 (the base model, shared by all runs)
render the same prompt subset with the same seeds and are scored with one reward. Writes to --out:
`curves.png` (one line per run), `curves.json` and `curves.csv` (run, step, reward, lora). A stopped run
continues where it stopped (the same command): each point is kept in curves.partial.jsonl as it is scored.

    python -m ncp.curves --run outputs/ncp-dpo --run outputs/diffusion-dpo --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts parti --max-prompts 64 --reward pickscore --out outputs/curves
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import torch

from ncp.errors import NcpError, run_cli
from ncp.evaluate import PICKSCORE_MODEL, PICKSCORE_PROCESSOR, REWARDS, make_scorer
from ncp.generate import add_render_args, default_device, dtype_of, load_pipeline, load_prompts, lora_loaded, render
from ncp.metrics import read_metrics, read_progress
from ncp.models import LORA_FILE

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def score_lora(pipe, prompts: list[str], seeds: list[int], scorer, batch_size: int = 8, steps: int = 25,
               guidance: float | None = None, resolution: int | None = None, negative_prompt: str | None = None) -> float:
    """Mean reward of `pipe` as it stands (LoRA on or off) over every prompt x seed.

    Cheap enough to call from a training loop every N steps with a small fixed prompt subset; the
    caller keeps prompts and seeds fixed so successive calls are comparable.
    """
    jobs = [(p, s) for p in prompts for s in seeds]
    scores = []
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet  # SD3 pipelines hold a transformer
    was_training = denoiser.training
    denoiser.eval()
    try:
        for i in range(0, len(jobs), batch_size):
            batch = jobs[i:i + batch_size]
            images = render(pipe, [p for p, _ in batch], [s for _, s in batch], steps, guidance, resolution,
                            negative_prompt)
            scores += scorer(images, [p for p, _ in batch])
    finally:
        denoiser.train(was_training)
    return sum(scores) / len(scores)


def _final_step(run: Path, ckpt_steps: list[int]) -> int:
    """Step of the final LoRA: last step in metrics.jsonl, else train.max_steps in config.yaml, else last checkpoint + 1."""
    steps = [r.get("step") for r in read_metrics(run)]
    steps = [s for s in steps if isinstance(s, int)]
    if steps:
        return max(steps)
    config = run / "config.yaml"
    if config.is_file():
        import yaml

        max_steps = ((yaml.safe_load(config.read_text()) or {}).get("train") or {}).get("max_steps")
        if isinstance(max_steps, int):
            return max_steps
    return max(ckpt_steps, default=0) + 1


def run_loras(run: str | Path) -> list[tuple[int, Path]]:
    """(step, LoRA folder) for each checkpoint of a run and its final LoRA, sorted by step.

    When the final LoRA shares a step with a checkpoint, the final one is kept (same weights).
    """
    run = Path(run)
    found = {}
    for d in sorted((run / "checkpoints").glob("checkpoint-*")):
        m = _CKPT.match(d.name)
        if m and (d / LORA_FILE).is_file():
            found[int(m[1])] = d
    if (run / LORA_FILE).is_file():
        found[_final_step(run, list(found))] = run
    if not found:
        raise NcpError(f"--run {run}: no {LORA_FILE} in the run folder or in checkpoints/checkpoint-*/")
    return sorted(found.items())


def curves(runs: list[str | Path], pipe, prompts: list[str], seeds: list[int], scorer, out_dir: str | Path,
           reward_name: str = "reward", **render_kwargs) -> dict:
    """Score step 0 (base) and every LoRA of every run; write curves.json, curves.csv and curves.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [Path(r).name for r in runs]
    if len(set(names)) != len(names):
        raise NcpError(f"--run: runs need distinct folder names, got {names}")
    settings = json.dumps(dict(reward=reward_name, prompts=list(prompts), seeds=list(seeds),
                               model=getattr(pipe, "name_or_path", None), dtype=str(getattr(pipe, "dtype", None)),
                               **{k: v for k, v in render_kwargs.items() if k != "batch_size"}),
                          sort_keys=True, default=str)  # what a point's score depends on
    partial = out_dir / "curves.partial.jsonl"  # points scored before a stop, with these settings
    done = {row["lora"]: row["reward"] for row in read_progress(partial) if row["settings"] == settings}

    def point(lora) -> float:
        key = "base" if lora is None else f"{lora}@{(Path(lora) / LORA_FILE).stat().st_mtime_ns}"
        if key not in done:
            with lora_loaded(pipe, lora):
                done[key] = score_lora(pipe, prompts, seeds, scorer, **render_kwargs)
            with open(partial, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(settings=settings, lora=key, reward=done[key])) + "\n")
        return done[key]

    base = point(None)
    points = {}
    for name, run in zip(names, runs):
        points[name] = [dict(step=0, reward=base, lora=None)]
        for step, lora in run_loras(run):
            reward = point(lora)
            points[name].append(dict(step=step, reward=reward, lora=str(lora)))
            print(f"{name} step {step}: {reward_name} {reward:.4f}")
    result = dict(reward=reward_name, prompts=list(prompts), seeds=list(seeds), runs=points)
    (out_dir / "curves.json").write_text(json.dumps(result, indent=2))
    with open(out_dir / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "step", "reward", "lora"])
        for name, rows in points.items():
            w.writerows([name, r["step"], r["reward"], r["lora"] or ""] for r in rows)
    plot(points, reward_name, out_dir / "curves.png")
    partial.unlink()
    return result


def plot(points: dict[str, list[dict]], reward_name: str, path: Path) -> None:
    """Reward vs step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in points.items():
        ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"mean {reward_name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_render_args(p)
    p.add_argument("--run", action="append", required=True, help="training run folder; repeat for several runs")
    p.add_argument("--reward", default="pickscore", choices=REWARDS)
    p.add_argument("--pickscore-model", default=PICKSCORE_MODEL)
    p.add_argument("--pickscore-processor", default=PICKSCORE_PROCESSOR)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    device = a.device or default_device()
    prompts = load_prompts(a.prompts, a.prompts_path, a.max_prompts)
    scorer = make_scorer(a.reward, device, a.pickscore_model, a.pickscore_processor)
    pipe = load_pipeline(a.model, device, dtype_of(a.dtype))
    with torch.no_grad():
        curves(a.run, pipe, prompts, a.seeds, scorer, a.out, a.reward, batch_size=a.batch_size, steps=a.steps,
               guidance=a.guidance, resolution=a.resolution, negative_prompt=a.negative_prompt)
    print(f"curves written to {Path(a.out) / 'curves.png'}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
