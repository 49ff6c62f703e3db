"""Publish a trained LoRA on the Hugging Face Hub with a model card built from the run folder.

The card (huggingface_hub's `ModelCard` + `ModelCardData`) carries the base model, the method and
loss space, the hyperparameters, the data, the final logged metrics, the latest validation grid
and the diffusers loading snippet. The uploaded folder holds exactly the LoRA, README.md and the grid.

The token is taken from `token=`, else `HF_TOKEN`, else the stored `hf auth login` (huggingface_hub
resolves the last two itself); it is passed to HfApi only, never printed or written.

    python -m ncp.hub --run outputs/ncp-dpo --repo-id USER/sd15-ncp-dpo [--private]
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

from ncp import families
from ncp.errors import NcpError, run_cli
from ncp.metrics import read_metrics
from ncp.models import LORA_FILE

GRID_FILE = "sample_grid.png"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_STEP = re.compile(r"^step-(\d+)\.png$")

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A LoRA for [{{ base_model }}]({{ base_model_link }}) trained with **{{ method }}** ({{ space_text }}),
{% if space == "perceptual" %}following *Aligning Diffusion Models with Noise-Conditioned Perception* (Gambashidze et al. 2024).
{%- else %}the latent-space objective (*Diffusion Model Alignment Using Direct Preference Optimization*, Wallace et
al. 2023, for DPO) that *Aligning Diffusion Models with Noise-Conditioned Perception* (Gambashidze et al. 2024)
compares against.{% endif %}

{% if grid %}## Samples

![validation samples]({{ grid }})

Validation prompts at step {{ grid_step }}{% if prompts %}: {{ prompts }}{% endif %}.
{% endif %}
## Use it

```python
import torch
from diffusers import {{ pipeline_class }}

pipe = {{ pipeline_class }}.from_pretrained("{{ base_model }}", dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{{ repo_id }}")
image = pipe("{{ example_prompt }}"{{ call_kwargs }}).images[0]
```

## Training

| setting | value |
|---|---|
| method | {{ method }} |
| loss space | {{ space }} |
{% for key, value in hyperparameters %}| {{ key }} | {{ value }} |
{% endfor %}
## Data

| setting | value |
|---|---|
{% for key, value in data %}| {{ key }} | {{ value }} |
{% endfor %}
## Final metrics

{% if metrics %}Last logged optimizer step ({{ metrics_step }}) of `metrics.jsonl`:

| metric | value |
|---|---|
{% for key, value in metrics %}| {{ key }} | {{ value }} |
{% endfor %}{% else %}No metrics were logged.
{% endif %}"""

HYPERPARAMETER_SECTIONS = ("objective", "encoder", "lora", "optim", "train")
HYPERPARAMETER_SKIP = {"train.output_dir", "train.resume_from", "train.validation_prompts", "train.validation_reward",
                       "train.log_every", "train.max_bad_steps", "train.keep_checkpoints", "train.overwrite",
                       "train.report_to"}


def _read_run(run: Path) -> tuple[dict, list[dict]]:
    """(config.yaml as a dict, metrics.jsonl rows) of a run; NcpError naming the file if one is unreadable."""
    import yaml

    if not (run / LORA_FILE).is_file():
        raise NcpError(f"--run {run}: no {LORA_FILE} (is this a finished training run?)")
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise NcpError(f"--run {run}: no config.yaml")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise NcpError(f"{config_path}: not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise NcpError(f"{config_path}: expected a mapping at the top level")
    return config, read_metrics(run)


def latest_grid(run: str | Path) -> tuple[Path | None, int | None]:
    """The validation grid of the highest step, and that step; (None, None) when the run has none."""
    grids = [(int(m[1]), p) for p in Path(run).glob("validation/step-*.png") if (m := _STEP.match(p.name))]
    if not grids:
        return None, None
    step, path = max(grids)
    return path, step


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _flatten(section: str, values: dict) -> list[tuple[str, str]]:
    return [(f"{section}.{k}", _fmt(v)) for k, v in values.items()
            if f"{section}.{k}" not in HYPERPARAMETER_SKIP and not isinstance(v, dict)]


def method_name(loss: str, space: str) -> str:
    """NCP-DPO / NCP-CPO / NCP-SFT in the perceptual space; the latent-space variants are Diffusion-*."""
    return f"{'NCP' if space == 'perceptual' else 'Diffusion'}-{loss.upper()}"


def build_model_card(run_dir: str | Path, repo_id: str | None = None, license: str | None = None):
    """The model card of a finished run (a `huggingface_hub.ModelCard`).

    `license` defaults to `hub.license` in the run's config; absent both, the card has no license
    field and the user sets it (the base model's licence usually applies to a LoRA).
    """
    from huggingface_hub import ModelCard, ModelCardData

    run = Path(run_dir)
    config, metrics = _read_run(run)
    model, objective, data = (config.get(k) or {} for k in ("model", "objective", "data"))
    base = str(model.get("pretrained") or "unknown")
    family = families.get(model["arch"]) if model.get("arch") else families.from_model_id(base)
    loss, space = str(objective.get("loss", "dpo")), str(objective.get("space", "perceptual"))
    method = method_name(loss, space)
    on_hub = bool(_HUB_ID.match(base)) and not Path(base).exists()
    license = license or (config.get("hub") or {}).get("license")
    data_path = data.get("path")
    card_data = ModelCardData(
        base_model=base if on_hub else None, license=license, library_name="diffusers",
        pipeline_tag="text-to-image",
        datasets=[data_path] if data.get("source") == "hub" and data_path and _HUB_ID.match(str(data_path)) else None,
        tags=["text-to-image", family.hub_tag, "diffusers",
              "lora", "ncp", method.lower(), f"{loss}"],
    )
    grid, grid_step = latest_grid(run)
    prompts = (config.get("train") or {}).get("validation_prompts") or []
    hyper = [kv for s in HYPERPARAMETER_SECTIONS for kv in _flatten(s, config.get(s) or {})]
    last = metrics[-1] if metrics else {}
    # the pipeline's own guidance unless the run set one (FLUX.1 dev's embedded guidance, its T5 length)
    call = {"num_inference_steps": 25, "guidance_scale": model.get("guidance"),
            "max_sequence_length": model.get("max_sequence_length")}
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE,
        title=f"{method} LoRA for {base}" if not repo_id else repo_id.split("/")[-1],
        base_model=base, base_model_link=f"https://huggingface.co/{base}" if on_hub else base,
        method=method, space=space,
        space_text=(f"noise-conditioned perceptual space of the {family.denoiser_kind} encoder"
                    if space == "perceptual" else "latent space"),
        pipeline_class=family.pipeline_name, call_kwargs="".join(f", {k}={v}" for k, v in call.items() if v is not None),
        repo_id=repo_id or "USER/REPO", example_prompt=(prompts[0] if prompts else "a photo of a cat").replace('"', "'"),
        grid=GRID_FILE if grid else None, grid_step=grid_step, prompts="; ".join(f"“{p}”" for p in prompts),
        hyperparameters=hyper, data=[(k, _fmt(v)) for k, v in data.items() if v is not None],
        metrics=[(k, _fmt(v)) for k, v in last.items() if k != "step"], metrics_step=last.get("step"),
    )


def prepare_upload_folder(run_dir: str | Path, folder: str | Path, repo_id: str | None = None,
                          license: str | None = None) -> Path:
    """Write exactly what gets uploaded into an empty `folder`: the LoRA, README.md (the card) and the grid."""
    run, folder = Path(run_dir), Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise NcpError(f"upload folder {folder} is not empty")
    card = build_model_card(run, repo_id, license)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run / LORA_FILE, folder / LORA_FILE)
    card.save(folder / "README.md")
    grid, _ = latest_grid(run)
    if grid is not None:
        shutil.copy2(grid, folder / GRID_FILE)
    return folder


def push_to_hub(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                license: str | None = None, commit_message: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload the LoRA, its card and the grid; return the commit URL."""
    from huggingface_hub import HfApi

    if not _HUB_ID.match(repo_id):
        raise NcpError(f"--repo-id must look like USER/NAME, got {repo_id!r}")
    api = HfApi(token=token)  # None: HF_TOKEN or the stored login, resolved by huggingface_hub
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_upload_folder(run_dir, Path(tmp) / "upload", repo_id, license)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=commit_message or f"Upload LoRA from {Path(run_dir).name}")
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="finished training run folder")
    p.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--license", help="license id for the card metadata (default: hub.license in config, else none)")
    p.add_argument("--dry-run", metavar="DIR", help="only write the upload folder to DIR")
    a = p.parse_args(argv)
    if a.dry_run:
        print(f"upload folder written to {prepare_upload_folder(a.run, a.dry_run, a.repo_id, a.license)}")
    else:
        print(f"uploaded: {push_to_hub(a.run, a.repo_id, a.private, license=a.license)}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
