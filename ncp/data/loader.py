"""Pair dataset and loader: `[winners; losers]` batches with identical transforms inside a pair.

Randomness: every per-item draw (crop, flip, empty prompt) comes from `random.Random(f"{seed}-{epoch}-{idx}")`,
and the shuffle order from a `torch.Generator` seeded by (seed, epoch). Nothing reads global RNG, so a batch
is the same with 0 or 8 workers and after a resume. Call `loader.dataset.set_epoch(epoch)` before each
epoch (the sampler reads the epoch from the dataset; workers are not persistent, so they see it too);
`endless_batches(loader, start)` does that and resumes at any batch.

Bad images (corrupt or missing): with `on_bad_image="skip"` the pair is reported once per process (a
warning, `bad_pair_ids`, and a line `<pair_id>\\t<file>\\t<error>` appended to `<output_dir>/bad_images.txt`)
and replaced by the next readable pair (idx+1, idx+2, ...). Batches therefore always hold B pairs and images
are decoded once, with no up-front scan of a large set; the price is that a neighbour pair appears twice in
that epoch. With `on_bad_image="error"` an NcpError names the pair, its uid and the file.
"""

from __future__ import annotations

import io
import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ncp.data.config import DataConfig
from ncp.data.sources import Pairs, load_pairs
from ncp.errors import NcpError

log = logging.getLogger(__name__)
BAD_IMAGES_FILE = "bad_images.txt"


class BadImage(Exception):
    """An image that cannot be decoded or is missing; `where` names the file (or dataset row)."""


def open_image(src, where: str) -> Image.Image:
    """Decode bytes / path / `{"bytes", "path"}` dict / PIL image to RGB, raising BadImage on failure."""
    try:
        if isinstance(src, dict):  # datasets' Image feature stored without decoding
            src = src.get("bytes") or src.get("path")
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, (bytes, bytearray)):
            img = Image.open(io.BytesIO(src))
        elif isinstance(src, (str, Path)):
            img = Image.open(src)
        else:
            raise BadImage(f"{where}: no image (got {type(src).__name__})")
        img.load()  # decode now, so a truncated file fails here and not later
        return img.convert("RGB")
    except BadImage:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...; FileNotFoundError for a missing file
        raise BadImage(f"{where}: {type(e).__name__}: {e}") from e


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1], the range the SD VAE encodes."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(127.5).sub(1.0)


def pair_transform(images, resolution: int, u: float, v: float, flip: bool):
    """Resize the shorter side to `resolution`, crop a square at fractions (u, v) of the slack, flip.

    The same (u, v, flip) goes to both images of a pair, so equal-size images get the same crop.
    Returns tensors, original (height, width) and crop (top, left) in the resized image; after a flip,
    `left` is measured in the flipped image (as if flipped before cropping, like diffusers' SDXL scripts).
    """
    out, sizes, corners = [], [], []
    for img in images:
        w, h = img.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BILINEAR)  # bilinear as in diffusers' train_diffusion_dpo.py
        top, left = round(u * (nh - resolution)), round(v * (nw - resolution))
        img = img.crop((left, top, left + resolution, top + resolution))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            left = nw - resolution - left
        out.append(to_tensor(img))
        sizes.append((h, w))
        corners.append((top, left))
    return out, sizes, corners


class PairDataset(Dataset):
    """Item i: pair i (or the next readable one) as `pixel_values` (2, 3, R, R) = [winner, loser],
    `prompt`, `original_size` (2, 2), `crop_top_left` (2, 2), `pair_id`."""

    def __init__(self, pairs: Pairs, cfg: DataConfig, seed: int, output_dir: str | None = None):
        self.pairs, self.cfg, self.seed, self.output_dir = pairs, cfg, seed, output_dir
        self.epoch = 0
        self.bad_pair_ids: set[str] = set()  # this process only; bad_images.txt gathers all workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def draws(self, idx: int) -> tuple[float, float, bool, bool]:
        """(crop u, crop v, flip, drop prompt) of item idx this epoch; always four draws in this order,
        so switching one option on does not change the others."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{idx}")
        u, v, f, e = rng.random(), rng.random(), rng.random(), rng.random()
        if self.cfg.crop == "center":
            u = v = 0.5
        return u, v, self.cfg.random_flip and f < 0.5, e < self.cfg.proportion_empty_prompts

    def __getitem__(self, idx: int) -> dict:
        n = len(self)
        for k in range(n):
            j = (idx + k) % n
            try:
                return self.load(j)
            except BadImage as e:
                self._bad(j, str(e))
        raise NcpError(f"data: every image of all {n} pairs is unreadable (see {BAD_IMAGES_FILE})")

    def load(self, j: int) -> dict:
        u, v, flip, drop = self.draws(j)
        (src_w, where_w), (src_l, where_l) = self.pairs.images.get(j)
        imgs = [open_image(src_w, where_w), open_image(src_l, where_l)]
        pix, sizes, corners = pair_transform(imgs, self.cfg.resolution, u, v, flip)
        return {
            "pixel_values": torch.stack(pix),
            "prompt": "" if drop else self.pairs.prompts[j],
            "original_size": torch.tensor(sizes, dtype=torch.long),
            "crop_top_left": torch.tensor(corners, dtype=torch.long),
            "pair_id": self.pairs.pair_ids[j],
        }

    def _bad(self, j: int, error: str) -> None:
        pid = self.pairs.pair_ids[j]
        if self.cfg.on_bad_image == "error":
            raise NcpError(f"data: pair {pid} (winner uid {self.pairs.win_uids[j]}, loser uid "
                           f"{self.pairs.lose_uids[j]}): bad image {error}; set data.on_bad_image=skip to skip it "
                           "(train.resume_from=latest may change it)")
        if pid in self.bad_pair_ids:
            return
        self.bad_pair_ids.add(pid)
        log.warning("skipping pair %s: %s", pid, error)
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, BAD_IMAGES_FILE), "a") as f:  # one short append: atomic
                f.write(f"{pid}\t{error}\n")


def read_bad_pair_ids(output_dir: str) -> set[str]:
    """Ids of every skipped pair so far, from all worker processes and epochs."""
    path = os.path.join(output_dir, BAD_IMAGES_FILE)
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return {line.split("\t", 1)[0] for line in f if line.strip()}


class ShardSampler(Sampler):
    """This process's share of one epoch's permutation, from batch `start` on.

    The permutation is seeded by (seed, epoch) and the epoch is read from the dataset (`set_epoch`), so every
    process draws the same one and takes every world-th index, and a resumed run starts mid-epoch without
    decoding the skipped images. Only whole batches are kept when there is at least one."""

    def __init__(self, dataset, seed: int, batch_size: int, rank: int = 0, world: int = 1):
        self.dataset, self.seed, self.batch_size, self.rank, self.world = dataset, seed, batch_size, rank, world
        self.start = 0
        per_rank = len(dataset) // world
        self.batches_per_epoch = per_rank // batch_size
        self.size = self.batches_per_epoch * batch_size or per_rank

    def __len__(self) -> int:
        return max(self.size - self.start * self.batch_size, 0)

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.dataset.epoch) % 2**63)
        order = torch.randperm(len(self.dataset), generator=g)[self.rank :: self.world][: self.size]
        return iter(order[self.start * self.batch_size :].tolist())


def endless_batches(loader: DataLoader, start: int = 0):
    """Batches epoch after epoch, from batch number `start` (counted from the first batch of epoch 0) on."""
    sampler = loader.sampler
    epoch, batch = divmod(start, sampler.batches_per_epoch)
    while True:
        loader.dataset.set_epoch(epoch)
        sampler.start = batch
        yield from loader
        epoch, batch = epoch + 1, 0


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave Ctrl-C / SIGTERM to the main process, which finishes its step and saves a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate_pairs(items: list[dict]) -> dict:
    """Per-pair items -> batch with every per-image tensor laid out `[winners; losers]` along dim 0."""
    batch = {"prompts": [it["prompt"] for it in items], "pair_id": [it["pair_id"] for it in items]}
    for key in items[0]:
        if key in ("prompt", "pair_id"):
            continue
        x = torch.stack([it[key] for it in items])  # (B, 2, ...) for images, (B, ...) for per-prompt tensors
        batch[key] = x.transpose(0, 1).reshape(-1, *x.shape[2:]) if key in PER_IMAGE else x
    return batch


PER_IMAGE = ("pixel_values", "latents", "original_size", "crop_top_left")


def build_dataloader(cfg: DataConfig, batch_size: int, seed: int, output_dir: str | None = None,
                     model: str | None = None, vae: str | None = None, rank: int = 0, world: int = 1) -> DataLoader:
    """Loader of `[winners; losers]` batches (see ARCHITECTURE.md, "Batch format") for process `rank` of `world`.
    The last partial batch is dropped when there is at least one full batch, so every step sees B pairs.

    With `cfg.cache_dir`, batches carry `latents` and `prompt_embeds` (+ `pooled_prompt_embeds`) instead of
    `pixel_values`; pass the run's `model` (and `vae` override) so a cache built for another model is refused.
    """
    cfg.validate()
    pairs = load_pairs(cfg)
    log.info("data: %d pairs from %s (%s)", len(pairs), cfg.path or "toy", pairs.stats)
    if cfg.cache_dir:
        from ncp.data.cache import CachedPairDataset

        dataset = CachedPairDataset(pairs, cfg, seed, output_dir, model, vae)
    else:
        dataset = PairDataset(pairs, cfg, seed, output_dir)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(dataset, seed, batch_size, rank, world),
        num_workers=cfg.num_workers,
        collate_fn=collate_pairs,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_stop_signals,
    )
