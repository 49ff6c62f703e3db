"""Built-in toy preference data: coloured shapes whose captions can be checked exactly.

Each pair shows one caption, "a <colour> <shape> on a <background> background". The winner draws
exactly that; the loser breaks it in one known way (wrong colour or wrong shape). Shapes are
centred with a fixed size, so `toy_reward` knows the region where the shape must be and scores
any image against its caption without a learned model.
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

from ncp.errors import NcpError

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
_CAPTION = re.compile(r"^an? (\w+) (\w+) on a (\w+) background$")


def toy_caption(colour: str, shape: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} on a {background} background"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a toy caption; NcpError for anything else."""
    m = _CAPTION.match(caption.strip())
    if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in BACKGROUNDS:
        raise NcpError(f"not a toy caption (want 'a[n] <colour> <shape> on a <background> background'): {caption!r}")
    return m[1], m[2], m[3]


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of the centred shape; the same drawing code renders the images."""
    img = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(img), shape, size, 255)
    return np.asarray(img) > 0


def _draw(draw: ImageDraw.ImageDraw, shape: str, size: int, fill) -> None:
    c, r = (size - 1) / 2, 0.32 * size  # centre and radius: the shape covers about a third of the image
    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=fill)
    elif shape == "square":
        h = 0.8 * r  # smaller half-side so the square's area is close to the circle's: colour alone can't tell
        draw.rectangle([c - h, c - h, c + h, c + h], fill=fill)
    else:
        draw.polygon([(c, c - r), (c - r, c + 0.8 * r), (c + r, c + 0.8 * r)], fill=fill)


def render(colour: str, shape: str, background: str, size: int = 32) -> Image.Image:
    """RGB image of one shape on a plain background (no antialiasing, so the reward of a match is exactly 1)."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    _draw(ImageDraw.Draw(img), shape, size, COLOURS[colour])
    return img


def toy_pair(seed: int, index: int, size: int = 32) -> tuple[str, Image.Image, Image.Image]:
    """(caption, winner, loser) of toy pair `index`; a pure function of (seed, index)."""
    rng = random.Random(f"toy-{seed}-{index}")
    colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
    if rng.random() < 0.5:  # loser breaks the colour
        bad = (rng.choice([c for c in COLOURS if c != colour]), shape, background)
    else:  # loser breaks the shape
        bad = (colour, rng.choice([s for s in SHAPES if s != shape]), background)
    return toy_caption(colour, shape, background), render(colour, shape, background, size), render(*bad, size)


def toy_prompts(n: int, seed: int = 0) -> list[str]:
    """n toy captions for validation images, drawn with their own seed stream."""
    rng = random.Random(f"toy-prompts-{seed}")
    return [toy_caption(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))) for _ in range(n)]


def _to_array(image) -> np.ndarray:
    """(H, W, 3) float array in [0, 255] from a PIL image, a uint8 array or a (3, H, W) tensor in [-1, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise NcpError(f"toy_reward wants a (3, H, W) tensor in [-1, 1]; got shape {tuple(t.shape)}")
        return ((t.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy().astype(np.float64)
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise NcpError(f"toy_reward wants an (H, W, 3) array; got shape {arr.shape}")
    return arr


def toy_reward(image, caption: str) -> float:
    """Agreement of an image with its toy caption, in [0, 1]; 1 exactly for a rendered match.

    reward = (closeness inside the caption's shape region + closeness outside it) / 2, where
    closeness = 1 - mean over pixels of |pixel - wanted colour| / 255 (per channel, L1). A wrong
    colour lowers the inside term; a wrong shape puts colour where background belongs and vice versa.
    """
    colour, shape, background = parse_caption(caption)
    arr = _to_array(image)
    if arr.shape[0] != arr.shape[1]:
        raise NcpError(f"toy_reward wants a square image; got {arr.shape[1]}x{arr.shape[0]}")
    mask = shape_mask(shape, arr.shape[0])
    inside = 1 - np.abs(arr[mask] - np.array(COLOURS[colour])).mean() / 255
    outside = 1 - np.abs(arr[~mask] - np.array(BACKGROUNDS[background])).mean() / 255
    return float((inside + outside) / 2)
