"""Tiny pipeline folders of every model family, built from configs, so everything runs offline.

The folders are written with `save_pretrained` and load with `from_pretrained` exactly like a hub
model: every loader in ncp is exercised on them. Random weights, about 1M denoiser parameters,
32 px images (16x16 latents). Each family builds its own (`Family.tiny`, `ncp.families`) from the shared
parts here: byte-level CLIP tokenizers, a T5 tokenizer, small CLIP text encoders and VAE.

    python -m ncp.tiny --arch sd15 --out outputs/tiny-sd15
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path

import torch

from . import families
from .errors import NcpError, run_cli

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
ARCHS = families.names()


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


@contextlib.contextmanager
def clip_tokenizers(out_dir, n: int):
    """(scratch folder, n CLIP tokenizers) while a pipeline is assembled; the second pads with "!" (OpenCLIP bigG,
    SDXL's and SD3's second tokenizer). The scratch folder under out_dir is removed afterwards."""
    from transformers import CLIPTokenizer

    tok_dir = Path(out_dir) / "_tokenizer_src"
    write_tokenizer(tok_dir)
    if n > 1:
        write_tokenizer(tok_dir / "2", pad_token="!")
    tokenizers = [CLIPTokenizer.from_pretrained(tok_dir)]
    if n > 1:
        tokenizers.append(CLIPTokenizer.from_pretrained(tok_dir / "2"))
    try:
        yield tok_dir, tokenizers
    finally:
        shutil.rmtree(tok_dir)


def text_encoder(vocab_size: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)


def tiny_vae(seed: int, **overrides):
    """A 2-level VAE (32 px -> 16x16 latents); overrides: e.g. 16 latent channels with a shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{
        **dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
               norm_num_groups=8, sample_size=32),
        **overrides})


def t5_encoder(vocab_size: int, seed: int):
    """A 2-layer T5 encoder, 96 wide, for the T5 tokenizer of `write_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


TINY_UNET = dict(  # what the SD1.5 and SDXL tiny U-Nets share
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, attention_head_dim=8,
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


def build_tiny_pipeline(out_dir: str | Path, arch: str = families.DEFAULT, seed: int = 0,
                        variant: str | None = None, width: int = 1, resolution: int | None = None) -> Path:
    """Write a complete tiny diffusers pipeline folder of the family named `arch` (of its `variant`, where it has
    several: flux dev | schnell); return its path. width / resolution: a larger toy (`widen`)."""
    family = families.get(arch)
    if variant is not None and variant not in family.variants:
        raise NcpError(f"--variant {variant!r}: {arch} has {', '.join(family.variants) or 'no variants'}")
    out = family.tiny(Path(out_dir), seed) if variant is None else family.tiny(Path(out_dir), seed, variant=variant)
    return widen(out, width, resolution, seed) if width != 1 or resolution is not None else out


def widen(folder: Path, width: int, resolution: int | None, seed: int = 0) -> Path:
    """The tiny pipeline in `folder` with its denoiser `width` times as wide (U-Net: every block's channels;
    transformers: more attention heads of the same size) and sized for `resolution` px (None: as it was), fresh
    weights drawn with `seed`; saved in place. The toy benchmark's larger toy for a GPU."""
    from .config import ModelConfig

    family = families.detect(folder)
    pipe = family.pipeline_class.from_pretrained(folder, **family.pipeline_extras(ModelConfig()))
    denoiser = getattr(pipe, family.denoiser_key)
    cfg = dict(denoiser.config)
    latent = resolution // pipe.vae_scale_factor if resolution else cfg.get("sample_size")
    if "block_out_channels" in cfg:  # U-Net
        cfg.update(block_out_channels=[c * width for c in cfg["block_out_channels"]], sample_size=latent)
    else:  # MMDiT: more heads of the same size
        cfg["num_attention_heads"] *= width
        if "caption_projection_dim" in cfg:
            cfg.update(caption_projection_dim=cfg["caption_projection_dim"] * width, sample_size=latent)
    torch.manual_seed(seed)
    pipe.register_modules(**{family.denoiser_key: type(denoiser).from_config(cfg)})
    pipe.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=list(ARCHS), default=families.DEFAULT)
    p.add_argument("--out", required=True, help="folder to write the pipeline to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", help="the family's variant, where it has several (flux: dev | schnell)")
    args = p.parse_args(argv)
    path = build_tiny_pipeline(args.out, args.arch, args.seed, args.variant)
    print(f"tiny {args.arch} pipeline written to {path}")


if __name__ == "__main__":
    run_cli(main)  # a user error is one `error: ...` line and exit code 2
