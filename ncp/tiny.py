"""Tiny SD1.5 / SDXL / SD3 pipeline folders built from configs, so everything runs offline.

The folders are written with `save_pretrained` and load with `from_pretrained` exactly like a hub
model: every loader in ncp is exercised on them. Random weights, about 1M U-Net parameters,
32 px images (16x16x4 latents). SD3: an MMDiT of 4 joint blocks (SD3.5's qk RMS-norm, a dual-attention
first block), two CLIP encoders with projection, a T5 encoder with a locally built tokenizer, a 16-channel
VAE with SD3's shift and scale, and SD3's flow-matching scheduler (shift 3); 16x16x16 latents.

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
ARCHS = ("sd15", "sdxl", "sd3")


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


def write_t5_tokenizer(out_dir: Path) -> None:
    """A T5 tokenizer (sentencepiece-style Unigram over single characters, `</s>` appended) built with the
    tokenizers library: no download, same special tokens and ids as T5 (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                    model_max_length=512).save_pretrained(out_dir)


def _t5(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


TINY_SD3_TRANSFORMER = dict(  # SD3.5-style MMDiT in miniature: 64 image tokens (16x16 latents, patch 2), 4 blocks
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3.5-medium scheduler


def _sd3_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(  # SD3's VAE: 16 channels, latents = (z - shift_factor) * scaling_factor, no quant convs
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def build_tiny_sd3(out_dir: Path, seed: int = 0) -> Path:
    """The SD3 pipeline folder (T5 included; ncp's model.text_encoder_3=false drops it as the pipeline can)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    tok_dir = out_dir / "_tokenizer_src"
    write_tokenizer(tok_dir)
    write_tokenizer(tok_dir / "2", pad_token="!")  # SD3's second CLIP tokenizer (OpenCLIP bigG) pads with "!"
    write_t5_tokenizer(tok_dir / "3")
    tokenizer, tokenizer_3 = CLIPTokenizer.from_pretrained(tok_dir), T5TokenizerFast.from_pretrained(tok_dir / "3")
    vocab_size = len(tokenizer)
    torch.manual_seed(seed + 2)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_SD3_TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=_sd3_vae(seed),
        text_encoder=_text_encoder(vocab_size, True, seed + 1), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(vocab_size, True, seed + 3), tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir / "2"),
        text_encoder_3=_t5(len(tokenizer_3), seed + 4), tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir)
    shutil.rmtree(tok_dir)
    return out_dir


def build_tiny_pipeline(out_dir: str | Path, arch: str = "sd15", seed: int = 0) -> Path:
    """Write a complete tiny diffusers pipeline folder for `arch` ("sd15", "sdxl" or "sd3"); return its path."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if arch == "sd3":
        return build_tiny_sd3(Path(out_dir), seed)
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
    p.add_argument("--arch", choices=list(ARCHS), default="sd15")
    p.add_argument("--out", required=True, help="folder to write the pipeline to")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"tiny {args.arch} pipeline written to {build_tiny_pipeline(args.out, args.arch, args.seed)}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
