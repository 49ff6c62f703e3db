"""FLUX.1 training memory, counted (not measured): weights at bf16 / int8 / nf4, the LoRA and its optimizer state,
and the activations of one NCP-DPO step at 1024 px, with and without gradient checkpointing. Parameters are
counted from the models' configs on the meta device (no weights, no download); the GPU check's cost-flux stage
measures the peak.

    python benchmarks/flux_memory.py                    # the markdown table of docs/flux.md
    python benchmarks/flux_memory.py --resolution 512 --rank 16

Assumptions (each a line of `table`):
  weights    bf16 2 bytes; int8 (LLM.int8) 1 byte + one fp32 scale per output row; nf4 0.5 byte + one fp32 absmax
             per block of 64 weights (diffusers' BitsAndBytesConfig default: no double quantization) = 0.5625 byte.
             Only nn.Linear weights are quantized (not proj_out, norms, biases, embeddings, convolutions).
  LoRA       rank r on FLUX's targets (ncp.families.flux.TARGETS): r * (in + out) per layer; fp32 weights + fp32
             gradients + 8-bit AdamW's two states (1 byte each) = 10 bytes a parameter.
  activations  per transformer block and token 34 * D bytes in bf16 (Korthikanti et al. 2022, "Reducing
             activation recomputation", with a fused attention kernel: no score matrix kept), D = 3072, tokens =
             (resolution / 16)^2 image + 512 T5 tokens, for the 2 images of a pair through all 57 blocks (the
             policy; the reference and f's primal keep nothing). Checkpointing per block keeps each block's inputs
             (2 bytes x D per token, both streams) plus one block's activations during the recompute.
  f          its K blocks' activations again, once: the difference error keeps the policy's call, never
             checkpointed (its backward runs when the LoRA is on again: ncp.encoder.as_base); the linearized error
             keeps nothing of its jvp and its backward recomputes one call of f (ncp.encoder.linearize), with the
             base's gradient checkpointing when it has it (the LoRA stays off there): K blocks' inputs plus one
             block's activations, as the policy's, else all K blocks' activations. The jvp's own working memory
             (one block's primal and two tangents at a time, freed as it goes) is not counted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncp.families.flux import TARGETS, default_blocks  # noqa: E402

GB = 1e9
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # google/t5-v1_1-xxl encoder
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408)  # openai/clip-vit-large-patch14 text model
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
BYTES = {"bf16": 2.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
T5_TOKENS, ACT_PER_TOKEN_D = 512, 34


def models() -> dict:
    """{name: module on the meta device} for FLUX.1's transformer, T5-XXL, CLIP-L and the VAE."""
    import diffusers
    import transformers

    from step_cost import FLUX1_TRANSFORMER

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"transformer": diffusers.FluxTransformer2DModel(**FLUX1_TRANSFORMER),
                "T5-XXL": transformers.T5EncoderModel(transformers.T5Config(**T5_XXL)),
                "CLIP-L": transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L)),
                "VAE": diffusers.AutoencoderKL(**FLUX_VAE)}


def weight_bytes(module: torch.nn.Module, kind: str, skip=("proj_out",)) -> float:
    """Bytes of the module's weights with its nn.Linear weights stored as `kind` (as ncp.quantize)."""
    total = 0.0
    linear = {id(m.weight): m for name, m in module.named_modules()
              if isinstance(m, torch.nn.Linear) and name not in skip}
    for p in module.parameters():
        m = linear.get(id(p))
        if m is None or kind == "bf16":
            total += 2 * p.numel()
        elif kind == "int8":
            total += p.numel() + 4 * m.out_features
        else:
            total += BYTES["nf4"] * p.numel()
    return total


def lora_params(transformer: torch.nn.Module, rank: int) -> int:
    """peft's suffix match of FLUX's targets: rank * (in + out) per matched linear."""
    return sum(rank * (m.in_features + m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS))


def activations(transformer, resolution: int, images: int = 2) -> dict:
    """Counted activation bytes kept for backward (see the module doc): the policy's forward without and with
    checkpointing, and f's K blocks per encoder.error (linearized: without and with checkpointing)."""
    c = transformer.config
    d = c.num_attention_heads * c.attention_head_dim
    tokens = (resolution // 16) ** 2 + T5_TOKENS
    blocks = c.num_layers + c.num_single_layers
    per_block = ACT_PER_TOKEN_D * d * tokens * images
    k = default_blocks(transformer)
    inputs = 2 * d * tokens * images  # a checkpointed block keeps its inputs: both streams, bf16
    return {"policy": blocks * per_block, "policy_checkpointed": blocks * inputs + per_block,
            "f_linearized": k * per_block, "f_linearized_checkpointed": k * inputs + per_block,
            "f_difference": k * per_block,
            "per_block": per_block, "blocks": blocks, "k": k, "tokens": tokens}


def table(resolution: int = 1024, rank: int = 64) -> str:
    parts = models()
    t = parts["transformer"]
    lora = lora_params(t, rank)
    act = activations(t, resolution)
    rows = {}
    for name, m in parts.items():
        quantized = name in ("transformer", "T5-XXL")  # model.quantize: the transformer and T5
        count = sum(p.numel() for p in m.parameters()) / 1e9
        cells = [weight_bytes(m, kind if quantized else "bf16") for kind in BYTES]
        rows[name] = (f"{name} weights ({count:.2f}B params)", cells)
    rows["lora"] = (f"LoRA rank {rank} ({lora / 1e6:.0f}M params): fp32 + grad + 8-bit AdamW", [10.0 * lora] * 3)
    for key, label in (("policy", f"policy activations, 1 pair = 2 images x {act['tokens']} tokens, no checkpointing"),
                       ("policy_checkpointed", "policy activations, gradient checkpointing per block"),
                       ("f_linearized", f"f's jvp, encoder.error=linearized ({act['k']} blocks: its backward's recomputed call)"),
                       ("f_linearized_checkpointed", "f's jvp, encoder.error=linearized, its recomputation checkpointed per block"),
                       ("f_difference", f"f, encoder.error=difference ({act['k']} blocks, the policy's call)")):
        rows[key] = (label, [act[key]] * 3)
    lines = [f"FLUX.1 NCP-DPO at {resolution} px, batch 1 pair, LoRA rank {rank}, f = the first {act['k']} double "
             "blocks. GB, counted, not measured (benchmarks/flux_memory.py).", "",
             "| GB | bf16 | int8 | nf4 |", "|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(f"{b / GB:.1f}" for b in cells) + " |" for label, cells in rows.values()]
    weights = ["transformer", "T5-XXL", "CLIP-L", "VAE", "lora"]
    for name, keep in (("all parts, no checkpointing, linearized", [*weights, "policy", "f_linearized"]),
                       ("all parts, checkpointing, linearized", [*weights, "policy_checkpointed", "f_linearized_checkpointed"]),
                       ("all parts, checkpointing, difference", [*weights, "policy_checkpointed", "f_difference"]),
                       ("latent cache (no T5 / CLIP / VAE), checkpointing, difference",
                        ["transformer", "lora", "policy_checkpointed", "f_difference"]),
                       ("latent cache (no T5 / CLIP / VAE), checkpointing, linearized",
                        ["transformer", "lora", "policy_checkpointed", "f_linearized_checkpointed"])):
        lines.append(f"| **total: {name}** | " + " | ".join(
            f"**{sum(rows[k][1][i] for k in keep) / GB:.1f}**" for i in range(len(BYTES))) + " |")
    lines += ["", f"Activations: {ACT_PER_TOKEN_D} x D x tokens x images bytes per block = "
                  f"{act['per_block'] / GB:.2f} GB per block for the pair, {act['blocks']} blocks. f's calls run "
                  "without checkpointing, except linearized's recomputation. Add the CUDA context and allocator slack (1-3 GB)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=64)
    a = p.parse_args(argv)
    out = table(a.resolution, a.rank)
    print(out)
    return out


if __name__ == "__main__":
    main()
