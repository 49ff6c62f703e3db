"""Tiny SD1.5 / SDXL pipeline folders built from configs, so everything runs offline.

The folders are written with `save_pretrained` and load with `from_pretrained` exactly like a hub
model: every loader in ncp is exercised on them. Random weights, about 1M U-Net parameters,
32 px images (16x16x4 latents).

    python -m ncp.tiny --arch sd15 --out outputs/tiny-sd15
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .errors import run_cli

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that CLIP's byte-level BPE uses (openai/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: every character is a token."""
    from transformers import CLIPTokenizer

    chars = _byte_unicode()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + list(SPECIAL_TOKENS))}
    tmp = out_dir / "_src"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(out_dir)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()


def _text_encoder(vocab_size: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )


def _unet(arch: str, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, attention_head_dim=8,
    )
    if arch == "sd15":
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, **common,
        )
    # SDXL: two text encoders (32 + 32 wide), pooled projection 32, six micro-conditioning numbers.
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        **common,
    )


SCHEDULER_CONFIG = dict(  # Stable Diffusion's training schedule (stable-diffusion-v1-5/stable-diffusion-v1-5 scheduler config)
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False,
)


def build_tiny_pipeline(out_dir: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Write a complete tiny diffusers pipeline folder for `arch` ("sd15" or "sdxl"); return its path."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    if arch not in ("sd15", "sdxl"):
        raise ValueError(f"arch must be 'sd15' or 'sdxl', got {arch!r}")
    out_dir = Path(out_dir)
    tok_dir = out_dir / "_tokenizer_src"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    vocab_size = len(tokenizer)
    if arch == "sd15":
        pipe = StableDiffusionPipeline(
            vae=_vae(seed), text_encoder=_text_encoder(vocab_size, False, seed + 1), tokenizer=tokenizer,
            unet=_unet(arch, seed + 2), scheduler=PNDMScheduler.from_config({**SCHEDULER_CONFIG, "skip_prk_steps": True}),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        write_tokenizer(tok_dir / "2", pad_token="!")  # SDXL's second tokenizer pads with "!"
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed), text_encoder=_text_encoder(vocab_size, False, seed + 1),
            text_encoder_2=_text_encoder(vocab_size, True, seed + 3), tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir / "2"), unet=_unet(arch, seed + 2),
            scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        )
    pipe.save_pretrained(out_dir)
    shutil.rmtree(tok_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--out", required=True, help="folder to write the pipeline to")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"tiny {args.arch} pipeline written to {build_tiny_pipeline(args.out, args.arch, args.seed)}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
