"""Latent cache: VAE latents and text-encoder outputs computed once, read by the loader instead of images.

    python -m ncp.data.cache --model stable-diffusion-v1-5/stable-diffusion-v1-5 --out cache/pick --source parquet \
        --path data/pickapic --resolution 512

What is stored (safetensors shards + `manifest.json`):
- `latents-<shard, 5 digits>.safetensors`: `latents` (N, C, h, w) = `vae.encode(x).latent_dist.mean * scaling_factor`
  (SD3: `(mean - shift_factor) * scaling_factor`, `Family.to_latents`)
  (the posterior mean, not a sample: the training loop encodes uncached images the same way),
  `original_size`, `crop_top_left` (N, 2); the image uids
  in the shard's metadata. Each image is stored once however many pairs show it (dedup by uid).
- `prompts-<shard, 5 digits>.safetensors`: `prompt_embeds` (N, L, D) and for SDXL / SD3 `pooled_prompt_embeds` (N, D2) of every
  distinct prompt plus "" (for proportion_empty_prompts).
- `manifest.json`: the key (model, vae, arch, resolution, crop, flip) the loader checks, plus uids of bad images.
Images are cached with a centre crop and no flip: random crops/flips would need one entry per variant, so
they are switched off with a warning when a cache is used. A finished shard is never rewritten, so an
interrupted build resumes where it stopped (same command).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ncp.data.config import DataConfig
from ncp.data.loader import BadImage, PairDataset, open_image, pair_transform
from ncp.data.sources import Pairs, load_pairs
from ncp.errors import NcpError, run_cli

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT = 1


def model_id(model: str) -> str:
    """A local folder by absolute path (so ./m and /abs/m match), a hub id as given."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def cache_key(model: str, vae: str | None, resolution: int) -> dict:
    """What the cached tensors depend on. Crop and flip are fixed: the cache stores centre crops only."""
    return {"format": FORMAT, "model": model_id(model), "vae": vae and model_id(vae), "resolution": resolution,
            "crop": "center", "flip": False}


def unique_images(pairs: Pairs) -> list[tuple[str, int, int]]:
    """(uid, pair index, side 0 = winner / 1 = loser) of each distinct image, in order of first appearance."""
    seen, out = set(), []
    for j, (w, l) in enumerate(zip(pairs.win_uids, pairs.lose_uids)):
        for side, uid in ((0, w), (1, l)):
            if uid not in seen:
                seen.add(uid)
                out.append((uid, j, side))
    return out


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a shard exists only when complete: that is what makes resuming safe


@torch.no_grad()
def build_cache(cfg: DataConfig, model: str, out: str, vae: str | None = None, shard_size: int = 1024,
                batch_size: int = 16, device: str = "cpu", max_sequence_length: int | None = None) -> Path:
    """Encode every distinct image and prompt of `cfg`'s pairs into `out`; skip shards already written.
    max_sequence_length: FLUX's T5 tokens per prompt, the run's model.max_sequence_length (None: the variant's)."""
    from tqdm.auto import tqdm

    from ncp.conditioning import encode_prompts
    from ncp.models import load_models

    cfg.validate()
    if cfg.crop != "center" or cfg.random_flip:
        warnings.warn("data cache: random crop / flip are not cached; caching centre crops without flips")
    cfg = replace(cfg, crop="center", random_flip=False, cache_dir=None)
    pairs = load_pairs(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = cache_key(model, vae, cfg.resolution)  # the T5 length is in the prompts shard's shape (the run checks it)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old["key"] != key:
            raise NcpError(f"{out}: holds a cache for {old['key']}, not {key}; use another --out folder")
    else:
        manifest_path.write_text(json.dumps({"key": key, "complete": False}, indent=1))

    models = load_models(model, vae=vae, device=device)
    if max_sequence_length is not None:  # as the run's configure will set it (other families refuse the key)
        from ncp.config import Config

        run = Config()
        run.model.max_sequence_length = max_sequence_length
        models.family.configure(models, run)
    images = unique_images(pairs)
    bad: dict[str, str] = {}
    n_shards = (len(images) + shard_size - 1) // shard_size
    bar = tqdm(total=len(images), desc="caching latents", unit="img")
    for k in range(n_shards):
        path = out / f"latents-{k:05d}.safetensors"
        chunk = images[k * shard_size:(k + 1) * shard_size]
        if path.exists():  # finished in an earlier run
            with safe_open(str(path), "pt") as f:
                bad.update(json.loads(f.metadata()["bad"]))
            bar.update(len(chunk))
            continue
        uids, pix, sizes, corners, shard_bad = [], [], [], [], {}
        for uid, j, side in chunk:
            src, where = pairs.images.get(j)[side]
            try:
                img = open_image(src, where)
            except BadImage as e:
                if cfg.on_bad_image == "error":
                    raise NcpError(f"data cache: image uid {uid} (pair {pairs.pair_ids[j]}): {e}") from e
                shard_bad[uid] = str(e)
                continue
            (x,), (size,), (corner,) = pair_transform([img], cfg.resolution, 0.5, 0.5, False)
            uids.append(uid), pix.append(x), sizes.append(size), corners.append(corner)
        vae = models.vae
        lat = [models.family.to_latents(vae, vae.encode(torch.stack(pix[i:i + batch_size]).to(device, vae.dtype))
                                        .latent_dist.mean.float().cpu()) for i in range(0, len(pix), batch_size)]
        c, h = models.vae.config.latent_channels, cfg.resolution // models.vae_scale_factor
        tensors = {"latents": torch.cat(lat) if lat else torch.zeros(0, c, h, h),
                   "original_size": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
                   "crop_top_left": torch.tensor(corners, dtype=torch.long).reshape(-1, 2)}
        _atomic_save(tensors, path, {"uids": json.dumps(uids), "bad": json.dumps(shard_bad)})
        bad.update(shard_bad)
        bar.update(len(chunk))
    bar.close()

    prompts = sorted(set(pairs.prompts) | {""})
    ppath = out / "prompts-00000.safetensors"
    done = set()
    if ppath.exists():
        with safe_open(str(ppath), "pt") as f:
            done = set(json.loads(f.metadata()["prompts"]))
    if not set(prompts) <= done:  # one prompt shard: text embeddings are small next to latents
        embeds, pooled = [], []
        for i in tqdm(range(0, len(prompts), batch_size), desc="caching prompts"):
            cond = encode_prompts(models, prompts[i:i + batch_size])
            embeds.append(cond.encoder_hidden_states.float().cpu())
            if cond.pooled is not None:
                pooled.append(cond.pooled.float().cpu())
        tensors = {"prompt_embeds": torch.cat(embeds)}
        if pooled:
            tensors["pooled_prompt_embeds"] = torch.cat(pooled)
        _atomic_save(tensors, ppath, {"prompts": json.dumps(prompts)})
    manifest_path.write_text(json.dumps({"key": key, "complete": True, "arch": models.arch, "images": len(images),
                                         "latent_shards": n_shards, "bad_uids": bad}, indent=1))
    log.info("cached %d images (%d bad) and %d prompts in %s", len(images), len(bad), len(prompts), out)
    return out


def rebuild_hint(cfg: DataConfig, model: str) -> str:
    return (f"rebuild it with: python -m ncp.data.cache --model {model} --out {cfg.cache_dir} "
            f"--source {cfg.source}" + (f" --path {cfg.path}" if cfg.path else "") + f" --resolution {cfg.resolution}")


class CachedPairDataset(PairDataset):
    """Like PairDataset, but items carry cached `latents` (2, C, h, w) and `prompt_embeds` (L, D)
    (+ `pooled_prompt_embeds` (D2) for SDXL) instead of pixels. Tensors are read lazily from the shards."""

    def __init__(self, pairs: Pairs, cfg: DataConfig, seed: int, output_dir: str | None = None,
                 model: str | None = None, vae: str | None = None):
        if cfg.crop != "center" or cfg.random_flip:
            warnings.warn("data.cache_dir is set: random crop / flip are off (the cache holds centre crops)")
            cfg = replace(cfg, crop="center", random_flip=False)
        super().__init__(pairs, cfg, seed, output_dir)
        root = Path(cfg.cache_dir)
        hint = rebuild_hint(cfg, model or "<model>")
        if not (root / MANIFEST).exists():
            raise NcpError(f"data.cache_dir={root}: no {MANIFEST} there; {hint}")
        manifest = json.loads((root / MANIFEST).read_text())
        have = manifest["key"]
        want = cache_key(model or have["model"], vae if model else have["vae"], cfg.resolution)
        if model is None:
            warnings.warn(f"data cache: no model given to check against; trusting {root} built for {have['model']}")
        if have != want or not manifest.get("complete"):
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            why = f"built for other settings (cache, wanted: {diff})" if diff else "incomplete"
            raise NcpError(f"data.cache_dir={root}: stale cache, {why}; {hint}")
        self.root, self.bad_uids = root, manifest["bad_uids"]
        self.index: dict[str, tuple[str, int]] = {}
        for path in sorted(root.glob("latents-*.safetensors")):
            with safe_open(str(path), "pt") as f:
                self.index.update({u: (path.name, i) for i, u in enumerate(json.loads(f.metadata()["uids"]))})
        with safe_open(str(root / "prompts-00000.safetensors"), "pt") as f:
            self.prompt_index = {p: i for i, p in enumerate(json.loads(f.metadata()["prompts"]))}
        missing = [u for u in pairs.win_uids + pairs.lose_uids if u not in self.index and u not in self.bad_uids]
        missing_p = [p for p in pairs.prompts if p not in self.prompt_index]
        if missing or missing_p:
            what = f"image uid {missing[0]!r}" if missing else f"prompt {missing_p[0]!r}"
            raise NcpError(f"data.cache_dir={root}: stale cache, it lacks {what} of these pairs "
                           f"({len(missing)} images, {len(missing_p)} prompts missing); {hint}")
        self._files = {}

    def __getstate__(self):  # open shard handles stay in their process
        return {**self.__dict__, "_files": {}}

    def _file(self, name: str):
        if name not in self._files:
            self._files[name] = safe_open(str(self.root / name), "pt")
        return self._files[name]

    def load(self, j: int) -> dict:
        _, _, _, drop = self.draws(j)
        rows = []
        for uid, side in ((self.pairs.win_uids[j], 0), (self.pairs.lose_uids[j], 1)):
            if uid in self.bad_uids:
                raise BadImage(f"image uid {uid}: {self.bad_uids[uid]} (when the cache was built)")
            rows.append(self.index[uid])
        get = lambda key, name, i: self._file(name).get_slice(key)[i:i + 1]  # noqa: E731  one row read
        prompt = "" if drop else self.pairs.prompts[j]
        pf, pi = self._file("prompts-00000.safetensors"), self.prompt_index[prompt]
        item = {
            "latents": torch.cat([get("latents", n, i) for n, i in rows]),
            "original_size": torch.cat([get("original_size", n, i) for n, i in rows]),
            "crop_top_left": torch.cat([get("crop_top_left", n, i) for n, i in rows]),
            "prompt_embeds": pf.get_slice("prompt_embeds")[pi:pi + 1][0],
            "prompt": prompt,
            "pair_id": self.pairs.pair_ids[j],
        }
        if "pooled_prompt_embeds" in pf.keys():
            item["pooled_prompt_embeds"] = pf.get_slice("pooled_prompt_embeds")[pi:pi + 1][0]
        return item


def _arg_type(type_name: str):
    """argparse converter for a DataConfig field type; bools parse 'true'/'false' (not `type=bool`)."""
    base = type_name.replace(" | None", "")
    def boolean(s: str) -> bool:
        if s.lower() not in ("true", "1", "false", "0"):
            raise argparse.ArgumentTypeError(f"{s!r} is not a boolean: true or false")
        return s.lower() in ("true", "1")

    conv = {"int": int, "float": float, "str": str, "bool": boolean}[base]
    if "None" in type_name:
        return lambda s: None if s.lower() in ("none", "null") else conv(s)
    return conv


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id (the one you will train)")
    p.add_argument("--out", required=True, help="cache folder (later: data.cache_dir)")
    p.add_argument("--vae", default=None, help="VAE override, e.g. madebyollin/sdxl-vae-fp16-fix")
    p.add_argument("--shard-size", type=int, default=1024, help="images per latents shard (the resume unit)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="FLUX: T5 tokens per prompt, the run's model.max_sequence_length (default: the variant's)")
    for f in fields(DataConfig):
        if f.name != "cache_dir":
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=f.default, type=_arg_type(str(f.type)))
    a = p.parse_args(argv)
    cfg = DataConfig(**{f.name: getattr(a, f.name) for f in fields(DataConfig) if f.name != "cache_dir"})
    try:
        return build_cache(cfg, a.model, a.out, a.vae, a.shard_size, a.batch_size, a.device, a.max_sequence_length)
    except NcpError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
