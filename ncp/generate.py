"""Render a prompt set with the base model and with LoRAs at fixed seeds, for side-by-side evaluation.

Every (prompt, seed) is rendered by every model with the same per-image generator, so the only
difference between a LoRA's image and the base image is the LoRA. Output:

    DIR/<model>/<prompt_idx>_<seed>.png
    DIR/index.jsonl   one row per image: prompt, prompt_idx, seed, model, lora, path (relative to DIR)
    DIR/generate.json the settings every image was rendered with

A stopped run continues where it stopped (the same command: rows are kept in index.partial.jsonl as batches
finish), and another LoRA rendered into the same DIR with the same settings joins the index beside the models
already there. DIR holding images of other settings is refused.

    python -m ncp.generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora outputs/run1 \\
        --prompts parti --max-prompts 100 --out outputs/gen --seeds 0 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from ncp import families
from ncp.errors import NcpError, run_cli
from ncp.metrics import read_progress
from ncp.models import LORA_FILE

PROMPT_SETS = {  # name -> (default hub id, split, caption column); docs/method.md "Evaluation prompts"
    "pickapic": ("yuvalkirstain/pickapic_v2", "validation_unique", "caption"),
    "parti": ("nateraw/parti-prompts", "train", "Prompt"),
}


# ---------------------------------------------------------------- prompts
def load_prompts(source: str, path: str | None = None, max_prompts: int | None = None) -> list[str]:
    """Prompts from a text file (one per line), or the named set "pickapic" / "parti".

    For a named set `path` may be a hub id (e.g. a Pick-a-Pic mirror such as `liuhuohuo2/pick-a-pic-v2`),
    a folder written by `Dataset.save_to_disk`, or a parquet file; default is the set's hub id.
    Hub Pick-a-Pic is streamed so only the 500 `validation_unique` rows are read, not 335 GB.
    """
    if source in PROMPT_SETS:
        hub_id, split, column = PROMPT_SETS[source]
        rows = _read_column(path or hub_id, split, column, max_prompts)
    else:
        file = Path(source)
        if not file.is_file():
            raise NcpError(f"--prompts: {source!r} is neither a file nor one of {sorted(PROMPT_SETS)}")
        rows = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        rows = [r for r in rows if r]
    if not rows:
        raise NcpError(f"--prompts {source!r}: no prompts found")
    return rows[:max_prompts] if max_prompts else rows


def _read_column(where: str, split: str, column: str, limit: int | None) -> list[str]:
    import datasets

    local = Path(where)
    if local.is_dir():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise NcpError(f"{where}: no split {split!r} (has {sorted(ds)})")
            ds = ds[split]
    elif local.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(local), split="train")
    else:
        ds = datasets.load_dataset(where, split=split, streaming=True)
    names = ds.column_names or []  # streaming datasets may not know their columns before the first row
    if names and column not in names:
        raise NcpError(f"{where}: no column {column!r} (has {names})")
    out = []
    for row in ds.select_columns([column]) if names else ds:
        if column not in row:
            raise NcpError(f"{where}: no column {column!r} (has {sorted(row)})")
        out.append(str(row[column]).strip())
        if limit and len(out) >= limit:
            break
    return out


# ---------------------------------------------------------------- models
def resolve_lora(spec: str) -> tuple[str, Path]:
    """(model name, folder) from `PATH` or `NAME=PATH`; PATH is a run, a checkpoint or the .safetensors file.

    The default name is the run folder's name, or `<run>-checkpoint-<step>` for a checkpoint.
    """
    # an existing path wins, so folders named like sweep points (`key=value`) need no NAME= prefix
    name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not (p / LORA_FILE).is_file():
        raise NcpError(f"--lora {spec!r}: no {LORA_FILE} in {p}")
    if not name:
        name = f"{p.parent.parent.name}-{p.name}" if p.name.startswith("checkpoint-") else p.name
    return name, p


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Any diffusers text-to-image pipeline (SD1.5, SDXL, ...). No safety checker: it blanks images and biases scores."""
    from diffusers import DiffusionPipeline

    from ncp.config import check_model_path

    check_model_path(model, "--model")  # a missing folder: one line now, not hub retries
    kwargs = {"dtype": dtype}  # diffusers 0.42 deprecates torch_dtype for pipelines
    if (Path(model) / "safety_checker").is_dir() or not Path(model).exists():
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(model, **kwargs).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ---------------------------------------------------------------- rendering
@contextlib.contextmanager
def lora_loaded(pipe, lora: str | Path | None):
    """`pipe` with the LoRA in `lora` (a run folder or file) loaded for the block, and without it afterwards, also
    after an error; None: `pipe` as it is."""
    if lora is None:
        yield pipe
        return
    pipe.load_lora_weights(str(lora), adapter_name="ncp")
    try:
        yield pipe
    finally:
        pipe.unload_lora_weights()


def sampling_kwargs(pipe) -> dict:
    """The family's call arguments that sample as its denoiser was trained (`Family.sampling_kwargs`)."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    family = families.of_denoiser(denoiser) if denoiser is not None else None
    return family.sampling_kwargs(denoiser) if family else {}


def render(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float | None = None,
           resolution: int | None = None, negative_prompt: str | None = None):
    """PIL images for prompts[i] with seeds[i], one CPU `torch.Generator` per image. `guidance` None: the
    pipeline's own default (SD1.5 7.5, SDXL 5, SD3 7; FLUX.1 dev embeds the guidance it was trained at, 3.5).

    CPU generators make an image depend only on its seed, not on the device or on which other
    images share its batch (diffusers draws each latent from its own generator).
    """
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=list(prompts), negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        generator=generators, num_inference_steps=steps, height=resolution, width=resolution, output_type="pil",
        **sampling_kwargs(pipe), **({} if guidance is None else {"guidance_scale": guidance}),
    )
    return out.images


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def generate(model: str, loras: list[str], prompts: list[str], out_dir: str | Path, seeds: list[int] = (0,),
             batch_size: int = 4, guidance: float | None = None, steps: int = 25, resolution: int | None = None,
             negative_prompt: str | None = None, include_base: bool = True, device: str | None = None,
             dtype: torch.dtype = torch.float32, pipe=None) -> list[dict]:
    """Render every prompt x seed with the base model ("base") and each LoRA; write images and index.jsonl.

    Returns the index rows of this call's models. `pipe` lets a caller reuse an already loaded pipeline (it must
    have no LoRA loaded). Images already in `out_dir` with these settings (same model, LoRA file and its time, prompt
    and seed) are kept, not rendered again.
    """
    out_dir = Path(out_dir)
    models = [("base", None)] if include_base else []
    models += [resolve_lora(spec) for spec in loras]
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise NcpError(f"--lora: two models share a name ({names}); name them with NAME=PATH")
    settings = dict(model=model, guidance=guidance, steps=steps, resolution=resolution, negative_prompt=negative_prompt,
                    dtype=str(dtype).removeprefix("torch."))  # what an image depends on besides model, prompt, seed
    done = _rendered(out_dir, settings)
    jobs = [(i, p, int(s)) for i, p in enumerate(prompts) for s in seeds]
    rows, partial = [], out_dir / "index.partial.jsonl"
    with open(partial, "a", encoding="utf-8") as log:
        for name, lora in models:
            stamp = (Path(lora) / LORA_FILE).stat().st_mtime_ns if lora else None  # a retrained LoRA renders again
            lora = str(lora) if lora else None
            kept = {job: done.get((name, job[0], job[2])) for job in jobs}
            kept = {job: row for job, row in kept.items()
                    if row and (row["prompt"], row["lora"], row.get("lora_time")) == (job[1], lora, stamp)}
            todo = [job for job in jobs if job not in kept]
            rows += list(kept.values())
            if not todo:
                continue
            if pipe is None:
                pipe = load_pipeline(model, device or default_device(), dtype)
            with lora_loaded(pipe, lora):
                (out_dir / name).mkdir(parents=True, exist_ok=True)
                for batch in _batches(todo, batch_size):
                    images = render(pipe, [p for _, p, _ in batch], [s for _, _, s in batch], steps, guidance,
                                    resolution, negative_prompt)
                    for (idx, prompt, seed), image in zip(batch, images):
                        rel = f"{name}/{idx}_{seed}.png"
                        image.save(out_dir / rel)
                        rows.append(dict(prompt=prompt, prompt_idx=idx, seed=seed, model=name, lora=lora, path=rel,
                                         lora_time=stamp))
                        log.write(json.dumps(rows[-1]) + "\n")
                    log.flush()
    order = {(n, i, s): k for k, (n, (i, _, s)) in enumerate((n, j) for n in names for j in jobs)}
    rows.sort(key=lambda r: order[(r["model"], r["prompt_idx"], r["seed"])])
    others = [r for r in done.values() if r["model"] not in names]  # models rendered here before, with these settings
    with open(out_dir / "index.jsonl.tmp", "w", encoding="utf-8") as f:
        for row in others + rows:
            f.write(json.dumps(row) + "\n")
    (out_dir / "index.jsonl.tmp").replace(out_dir / "index.jsonl")
    partial.unlink()
    return rows


def _rendered(out_dir: Path, settings: dict) -> dict:
    """{(model, prompt_idx, seed): index row} of the images already in `out_dir` with `settings` (writing them to
    generate.json for a new folder); a folder whose images were rendered otherwise is refused."""
    saved = out_dir / "generate.json"
    if saved.is_file():
        if json.loads(saved.read_text()) != settings:
            raise NcpError(f"--out {out_dir}: holds images rendered with other settings ({saved}); use another --out")
    else:
        if (out_dir / "index.jsonl").exists():  # made before settings were recorded: rendered again, as then
            print(f"{out_dir}: index.jsonl without generate.json (its settings unknown): rendering every image again")
            (out_dir / "index.jsonl").unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(settings, indent=2))
    rows = read_progress(out_dir / "index.jsonl") + read_progress(out_dir / "index.partial.jsonl")
    return {(r["model"], r["prompt_idx"], r["seed"]): r for r in rows if (out_dir / r["path"]).is_file()}


def add_render_args(p: argparse.ArgumentParser) -> None:
    """Rendering flags shared with ncp.curves."""
    p.add_argument("--model", required=True, help="base pipeline: hub id or local folder")
    p.add_argument("--prompts", required=True, help="text file (one prompt a line), 'pickapic' or 'parti'")
    p.add_argument("--prompts-path", help="hub id, save_to_disk folder or parquet file for pickapic/parti; "
                   "yuvalkirstain/pickapic_v2 answers 404 since 2025, so pass a mirror or a local copy")
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's: SD1.5 7.5, SDXL 5, SD3 7; "
                   "FLUX.1 dev's embedded guidance 3.5)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--negative-prompt")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_render_args(p)
    p.add_argument("--lora", nargs="+", action="extend", default=[],
                   help="run folder, checkpoint folder or NAME=PATH; repeatable")
    p.add_argument("--no-base", action="store_true", help="render only the LoRAs")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    prompts = load_prompts(a.prompts, a.prompts_path, a.max_prompts)
    rows = generate(a.model, a.lora, prompts, a.out, a.seeds, a.batch_size, a.guidance, a.steps, a.resolution,
                    a.negative_prompt, not a.no_base, a.device, dtype_of(a.dtype))
    print(f"{len(rows)} images, index at {Path(a.out) / 'index.jsonl'}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
