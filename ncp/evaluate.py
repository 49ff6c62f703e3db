"""Score generated images with reward models; per-model means and win rates over a baseline.

Reads the index written by `ncp.generate`, scores every image with each reward, and writes
`results.json`, `results.md` (Markdown table) and `scores.jsonl` (one row per image) to --out.

Win rate of A over the baseline = share of (prompt, seed) pairs where A's image scores higher,
ties counted as half, averaged per prompt (docs/method.md, "Rewards used for evaluation"). Its 95%
interval is the Wilson score interval (Wilson 1927) over the prompts, not the images: the seeds of one
prompt are not independent trials.

A stopped evaluation continues where it stopped (the same command): each reward's scores are kept in
scores-<reward>.partial.jsonl as batches finish, until the results are written.

    python -m ncp.evaluate --index outputs/gen/index.jsonl --reward pickscore hpsv2 --out outputs/eval
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
from pathlib import Path

import torch
from PIL import Image

from ncp.errors import NcpError, run_cli
from ncp.metrics import read_progress

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"  # docs/method.md: PickScore model and CLIP-H processor
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
REWARDS = ("pickscore", "hpsv2", "imagereward", "toy")
Z95 = 1.959963984540054  # standard normal 97.5% quantile


class RewardUnavailable(RuntimeError):
    """An optional reward whose package is not importable; evaluation reports it and goes on."""


# ---------------------------------------------------------------- scorers: (images, prompts) -> list of floats
class PickScore:
    """PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(text_emb, image_emb)` of a CLIP model.

    Follows the reference snippet on the yuvalkirstain/PickScore_v1 model card; embeddings are taken
    through the projection heads directly so the code does not depend on transformers' return types.
    """

    name = "pickscore"

    def __init__(self, model: str = PICKSCORE_MODEL, processor: str = PICKSCORE_PROCESSOR, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, CLIPModel

        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = CLIPModel.from_pretrained(model, torch_dtype=dtype).to(device).eval()
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        m = self.model
        pix = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        img_emb = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        txt_emb = m.text_projection(m.text_model(input_ids=text["input_ids"].to(self.device),
                                                 attention_mask=text["attention_mask"].to(self.device)).pooler_output)
        cos = torch.nn.functional.cosine_similarity(img_emb.float(), txt_emb.float(), dim=-1)
        return (m.logit_scale.exp().float() * cos).tolist()


class HPSv2:
    """Human Preference Score v2.1 with the `hpsv2` package's model (open_clip ViT-H-14, checkpoint xswu/HPSv2):
    the checkpoint loaded once and images scored in batches, as `hpsv2.score` scores one image (its call downloads
    and loads the 2 GB checkpoint again each time). Score = cos(image, text) features, its logit's diagonal."""

    name = "hpsv2"

    def __init__(self, version: str = "v2.1", device: str = "cpu"):
        _import_optional("hpsv2", "pip install hpsv2")
        import huggingface_hub
        from hpsv2.img_score import initialize_model, model_dict
        from hpsv2.src.open_clip import get_tokenizer
        from hpsv2.utils import hps_version_map

        initialize_model()
        checkpoint = huggingface_hub.hf_hub_download("xswu/HPSv2", hps_version_map[version])
        self.model, self.preprocess = model_dict["model"], model_dict["preprocess_val"]
        self.model.load_state_dict(torch.load(checkpoint, map_location="cpu")["state_dict"])
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.tokenizer = get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def __call__(self, images, prompts):
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):  # the package's amp
            out = self.model(pixels, self.tokenizer(list(prompts)).to(self.device))
        return (out["image_features"].float() * out["text_features"].float()).sum(-1).tolist()


class ImageReward:
    """ImageReward (Xu et al. 2023) through the `image-reward` package (`import ImageReward`)."""

    name = "imagereward"

    def __init__(self, device: str = "cpu"):
        rm = _import_optional("ImageReward", "pip install image-reward (it does not import with transformers 5)")
        self.model = rm.load("ImageReward-v1.0", device=device)

    def __call__(self, images, prompts):
        return [float(self.model.score(p, [img])) for img, p in zip(images, prompts)]


class ToyReward:
    """`ncp.data.toy.toy_reward`: exact caption agreement for the built-in toy shapes, no learned model."""

    name = "toy"

    def __init__(self):
        self.reward = _import_optional("ncp.data.toy", "the toy data module is not in this checkout").toy_reward

    def __call__(self, images, prompts):
        return [float(self.reward(img, p)) for img, p in zip(images, prompts)]


def _import_optional(module: str, hint: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - broken installs raise more than ImportError (ImageReward on transformers 5)
        raise RewardUnavailable(f"{module} is not importable ({type(e).__name__}: {e}); {hint}") from e


def make_scorer(name: str, device: str = "cpu", pickscore_model: str = PICKSCORE_MODEL,
                pickscore_processor: str = PICKSCORE_PROCESSOR):
    """The scorer for reward `name`; raises RewardUnavailable when its package is missing."""
    if name == "pickscore":
        return PickScore(pickscore_model, pickscore_processor, device)
    if name == "hpsv2":
        return HPSv2(device=device)
    if name == "imagereward":
        return ImageReward(device)
    if name == "toy":
        return ToyReward()
    raise NcpError(f"--reward: unknown reward {name!r}; choose from {REWARDS}")


# ---------------------------------------------------------------- statistics
def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (ties may make `successes` a half-integer)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(a: dict, b: dict) -> dict:
    """Win rate of scores `a` over `b`, both {(prompt_idx, seed): score}, on their shared keys: the share of images
    (prompt, seed) where a scores higher, ties half, averaged per prompt first. The 95% Wilson interval counts
    prompts, not images: the seeds of one prompt are not independent trials (an image-level interval covered a
    true rate 88% of the time at 2 seeds), and a prompt's share in [0, 1] varies no more than a coin's."""
    keys = sorted(set(a) & set(b))
    wins = sum(a[k] > b[k] for k in keys)
    ties = sum(a[k] == b[k] for k in keys)
    per_prompt: dict = {}
    for k in keys:
        outcome = 1.0 if a[k] > b[k] else 0.5 if a[k] == b[k] else 0.0
        per_prompt.setdefault(k[0] if isinstance(k, tuple) else k, []).append(outcome)
    prompts = len(per_prompt)
    share = sum(sum(v) / len(v) for v in per_prompt.values()) / prompts if prompts else float("nan")
    low, high = wilson_interval(share * prompts, prompts) if prompts else (float("nan"), float("nan"))
    return dict(win_rate=share, low=low, high=high, n=len(keys), prompts=prompts, wins=wins, ties=ties)


# ---------------------------------------------------------------- index and scoring
def read_index(path: str | Path) -> list[dict]:
    """Rows of an index.jsonl; image paths made absolute (relative ones are relative to the index's folder)."""
    path = Path(path)
    if not path.is_file():
        raise NcpError(f"--index: {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NcpError(f"{path}, line {n}: not JSON ({e})") from e
        missing = [k for k in ("prompt", "prompt_idx", "seed", "model", "path") if k not in row]
        if missing:
            raise NcpError(f"{path}, line {n}: missing key(s) {missing}")
        image = Path(row["path"])
        row["file"] = str(image if image.is_absolute() else path.parent / image)
        if not Path(row["file"]).is_file():
            raise NcpError(f"{path}, line {n}: no image {row['file']}")
        rows.append(row)
    if not rows:
        raise NcpError(f"{path}: no rows")
    return rows


def score_rows(rows: list[dict], scorer, batch_size: int = 16, partial: Path | None = None) -> list[float]:
    """The scorer's score for each row's image, in row order. With `partial`, scores are appended there as batches
    finish, and the rows it already holds are not scored again."""
    keys = [f"{r['model']}|{r['prompt_idx']}|{r['seed']}|{r['file']}@{os.stat(r['file']).st_mtime_ns}" for r in rows]
    done = dict(read_progress(partial)) if partial is not None else {}
    todo = [(k, r) for k, r in zip(keys, rows) if k not in done]
    with open(partial, "a", encoding="utf-8") if partial is not None else contextlib.nullcontext() as log:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            images = [Image.open(r["file"]).convert("RGB") for _, r in batch]
            for (k, _), s in zip(batch, scorer(images, [r["prompt"] for _, r in batch])):
                done[k] = s
                if log is not None:
                    log.write(json.dumps([k, s]) + "\n")
            if log is not None:
                log.flush()
    return [done[k] for k in keys]


def summarise(rows: list[dict], scores: dict[str, list[float]], baseline: str = "base") -> dict:
    """Per reward: mean score per model and win rate of each model over `baseline`."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    if baseline not in models:
        raise NcpError(f"--baseline {baseline!r} is not a model in the index (models: {models})")
    images = {m: {(r["prompt_idx"], r["seed"]): r["prompt"] for r in rows if r["model"] == m} for m in models}
    for m in models:  # a win rate compares the same prompt and seed; a merged index may not hold them
        if images[m] != images[baseline]:
            odd = sorted(set(images[m].items()) ^ set(images[baseline].items()))[0]
            raise NcpError(f"model {m!r} and the baseline {baseline!r} do not have the same images: (prompt_idx, seed) "
                           f"{odd[0]} with prompt {odd[1]!r} is in one only; render both from one prompt list and seeds")
    out = {}
    for reward, values in scores.items():
        by_model = {m: {} for m in models}
        for r, v in zip(rows, values):
            by_model[r["model"]][(r["prompt_idx"], r["seed"])] = v
        entry = {"mean": {m: sum(d.values()) / len(d) for m, d in by_model.items()},
                 "n": {m: len(d) for m, d in by_model.items()}, "win_rate": {}}
        entry["win_rate"] = {m: win_rate(d, by_model[baseline]) for m, d in by_model.items() if m != baseline}
        out[reward] = entry
    return out


def to_markdown(results: dict) -> str:
    """One table: a row per model, mean and win rate [95% CI] per reward; skipped rewards listed below."""
    rewards = results["rewards"]
    base = results["baseline"]
    models = list(dict.fromkeys(m for r in rewards.values() for m in r["mean"]))
    head = ["model"] + [c for name in rewards for c in (f"{name} mean", f"{name} win rate vs {base} [95% CI]")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        cells = [m]
        for r in rewards.values():
            cells.append(f"{r['mean'][m]:.4f}" if m in r["mean"] else "")
            w = r["win_rate"].get(m)
            cells.append(f"{w['win_rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] (n={w['n']}, {w['prompts']} prompts)"
                         if w else "-")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += (f"\nWin rate: share of (prompt, seed) pairs scored higher than `{base}`, ties as half, averaged per "
             f"prompt; {results['interval']}.\n")
    for name, why in results["skipped"].items():
        text += f"\nSkipped {name}: {why}\n"
    return text


def evaluate(index: str | Path, rewards: list[str], out_dir: str | Path, baseline: str = "base",
             batch_size: int = 16, device: str = "cpu", scorers: dict | None = None, **scorer_kwargs) -> dict:
    """Score the index with each reward (unavailable ones are skipped and reported); write the results.

    `scorers` maps reward names to ready scorers (callables), used instead of building them.
    """
    rows = read_index(index)
    summarise(rows, {}, baseline)  # fail on a wrong --baseline before loading any reward model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores, skipped = {}, {}
    for name in rewards:
        try:
            scorer = (scorers or {}).get(name) or make_scorer(name, device, **scorer_kwargs)
        except RewardUnavailable as e:
            skipped[name] = str(e)
            print(f"skipping reward {name}: {e}")
            continue
        scores[name] = score_rows(rows, scorer, batch_size, out_dir / f"scores-{name}.partial.jsonl")
    results = {"index": str(index), "baseline": baseline, "interval": "95% Wilson score interval over prompts",
               "rewards": summarise(rows, scores, baseline), "skipped": skipped}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(to_markdown(results))
    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({**{k: r[k] for k in ("model", "prompt_idx", "seed", "path")},
                                **{name: s[i] for name, s in scores.items()}}) + "\n")
    for name in scores:
        (out_dir / f"scores-{name}.partial.jsonl").unlink()
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index.jsonl written by ncp.generate")
    p.add_argument("--reward", nargs="+", default=["pickscore"], choices=REWARDS)
    p.add_argument("--pickscore-model", default=PICKSCORE_MODEL)
    p.add_argument("--pickscore-processor", default=PICKSCORE_PROCESSOR)
    p.add_argument("--baseline", default="base", help="model name the others are compared with")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    results = evaluate(a.index, a.reward, a.out, a.baseline, a.batch_size, a.device,
                       pickscore_model=a.pickscore_model, pickscore_processor=a.pickscore_processor)
    print(to_markdown(results))


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
