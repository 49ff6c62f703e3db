"""Per-pair step time and peak memory of the real training command (`train_ncp_dpo.py`), from the latent cache.

What a user runs, end to end: an SD1.5-architecture pipeline folder with random weights (860M-parameter U-Net,
SD's VAE, a CLIP ViT-L/14-size text encoder; written once with `save_pretrained`), toy pairs cached with
`python -m ncp.data.cache` at the given resolution, then `train_ncp_dpo.py` for a few steps, 1 pair per step,
LoRA rank 64, 8-bit AdamW, once per setting and in alternating rounds (these machines drift by 10-15%).
Reports the median step time of steps 3 on (from metrics.jsonl; step 1 holds any compiling) and the peak
RSS of the whole training process (getrusage of the child), and each setting's ratio to the first. It compares
ncp's settings with each other only: a ratio to another trainer counts only when both ran side by side in one
alternated run (benchmarks/RESULTS.md section 5 has such a run against the authors' and diffusers' scripts).

    python benchmarks/train_cost.py --resolution 128 --steps 12 --rounds 2 \\
        --setting plain= --setting fast=train.compile=true,train.channels_last=true
    python benchmarks/train_cost.py --model tiny --resolution 32 --steps 4 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

def write_sd15_pipeline(out: Path) -> Path:
    """An SD1.5-architecture pipeline with random weights (configs of stable-diffusion-v1-5), saved once."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ncp.tiny import SCHEDULER_CONFIG, write_tokenizer
    from step_cost import SD15_UNET

    if (out / "model_index.json").exists():
        return out
    torch.manual_seed(0)
    write_tokenizer(out / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, max_position_embeddings=77, projection_dim=768))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
                                   unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDPMScheduler.from_config(SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def one_run(model: Path, cache: Path, pairs: int, out: Path, resolution: int, steps: int, rank: int,
            threads: int | None, overrides: list[str]) -> dict:
    """train_ncp_dpo.py in a child process; its median step time (steps 3 on) and peak RSS."""
    import os

    from ncp.metrics import read_metrics

    cmd = [sys.executable, str(ROOT / "train_ncp_dpo.py"), "--config", str(ROOT / "configs/tiny_sd15_ncp_dpo.yaml"),
           f"model.pretrained={model}", f"data.cache_dir={cache}", f"data.resolution={resolution}",
           f"data.toy_num_pairs={pairs}",
           f"train.output_dir={out}", "train.overwrite=true", "train.batch_size=1", f"train.max_steps={steps}",
           f"train.checkpoint_every={steps}", "train.validation_prompts=[]", "train.report_to=none", f"lora.rank={rank}",
           "optim.optimizer=adamw8bit", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{log.read_text()[-3000:]}")
    rows = read_metrics(out)
    step_s = [1 / r["samples_per_s"] for r in rows]
    return dict(step_s=statistics.median(step_s[2:] or step_s), first_step_s=step_s[0], steps=step_s,
                peak_gb=usage.ru_maxrss / 2**20, wall_s=time.perf_counter() - t0,
                compile_s=rows[-1].get("compile_s"), recompiles=rows[-1].get("recompiles"))


def main(argv: list[str] | None = None) -> dict:
    from step_cost import write_json

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="sd15 (random-weight SD1.5 architecture) or tiny (ncp.tiny)")
    p.add_argument("--work", default="outputs/train-cost", help="pipeline folder, cache and runs go here")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--pairs", type=int, default=32, help="toy pairs in the cache")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the median is of steps 3 on)")
    p.add_argument("--rounds", type=int, default=2, help="runs per setting, settings alternating")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the training processes")
    p.add_argument("--setting", action="append", default=[],
                   help="NAME=key=value,key=value (overrides of that setting); default: plain and the full fast path")
    p.add_argument("--json")
    a = p.parse_args(argv)
    settings = dict(s.split("=", 1) for s in a.setting) or {
        "plain": "", "fast": "train.compile=true,train.channels_last=true"}
    work = Path(a.work)
    if a.model == "tiny":
        from ncp.tiny import build_tiny_pipeline

        model = work / "tiny-sd15"
        if not (model / "model_index.json").exists():
            build_tiny_pipeline(model, "sd15")
    else:
        model = write_sd15_pipeline(work / "sd15-random")
    cache = work / f"cache-{a.model}-{a.resolution}"
    if not (cache / "DONE").exists():
        from ncp.data.cache import main as build_cache

        build_cache(["--model", str(model), "--out", str(cache), "--resolution", str(a.resolution),
                     "--toy-num-pairs", str(a.pairs)])
        (cache / "DONE").write_text("")
    results = {name: [] for name in settings}
    for r in range(a.rounds):
        for name, over in (list(settings.items()) if r % 2 == 0 else list(settings.items())[::-1]):
            res = one_run(model, cache, a.pairs, work / "runs" / name, a.resolution, a.steps, a.rank, a.threads,
                          [o for o in over.split(",") if o])
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['step_s']:.2f} s/step (first {res['first_step_s']:.1f} s), "
                  f"peak {res['peak_gb']:.2f} GB", flush=True)
    plain = statistics.median(x["step_s"] for x in next(iter(results.values())))
    print(f"\n{a.model} at {a.resolution} px from the cache, 1 pair/step, LoRA rank {a.rank}, {a.steps} steps x "
          f"{a.rounds} rounds\n\n| run | s/step (median of rounds) | vs first setting | peak GB | first step s |\n|---|---|---|---|---|")
    summary = {}
    for name, runs in results.items():
        s = statistics.median(x["step_s"] for x in runs)
        summary[name] = dict(step_s=s, ratio=s / plain, peak_gb=max(x["peak_gb"] for x in runs),
                             first_step_s=max(x["first_step_s"] for x in runs), runs=runs)
        print(f"| ncp NCP-DPO {name} | {s:.2f} | {s / plain:.3f}x | {summary[name]['peak_gb']:.2f} | "
              f"{summary[name]['first_step_s']:.1f} |")
    result = dict(settings=settings, summary=summary, model=a.model, resolution=a.resolution)
    if a.json:
        write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
