"""FLOPs of the DiT perceptual encoder f (first K joint / double-stream blocks) as a share of one transformer
forward, for several K and latent sizes, counted on the meta device (no memory, no compute: seconds):
SD3.5 Medium (--model sd3) or FLUX.1 dev (--model flux: embedders + the first K of 19 double blocks, 512 T5 tokens).

The U-Net's down path, f for SD1.5/SDXL, is about 30% of a U-Net forward (benchmarks/step_cost.py); this gives
the K with the same share for the MMDiT (docs/sd3.md, docs/flux.md).

    python benchmarks/sd3_encoder_share.py --json outputs/bench/sd3_encoder_share.json
    python benchmarks/sd3_encoder_share.py --model flux --json outputs/bench/flux_encoder_share.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_cost import FLUX1_TRANSFORMER, SD35M_TRANSFORMER  # noqa: E402

from ncp.conditioning import Cond  # noqa: E402
from ncp.encoder_dit import DiTPerceptualEncoder  # noqa: E402
from ncp.families.sd3 import T5_TOKENS  # noqa: E402

SD3_TOKENS = 77 + T5_TOKENS  # CLIP tokens + T5 tokens (StableDiffusion3Pipeline's default max_sequence_length)


def encoder_share(ks=(1, 2, 3, 4, 6, 8, 12, 24), latent_sizes=(16, 64, 128), config=SD35M_TRANSFORMER) -> dict:
    """{latent size: {"transformer_tflop": T, K: FLOPs(f_K) / FLOPs(transformer)}} for one image and 333 text tokens."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        tr = SD3Transformer2DModel(**config)
    tr.requires_grad_(False)
    out = {}
    for lat in latent_sizes:
        x = torch.randn(1, config["in_channels"], lat, lat, device="meta")
        c = Cond(torch.randn(1, SD3_TOKENS, config["joint_attention_dim"], device="meta"),
                 pooled_projections=torch.randn(1, config["pooled_projection_dim"], device="meta"))
        ts = torch.tensor([500.0], device="meta")
        with FlopCounterMode(display=False) as fc:
            tr(x, timestep=ts, **c.unet_kwargs())
        u = fc.get_total_flops()
        row = {"transformer_tflop": u / 1e12}
        for k in ks:
            with torch.device("meta"):
                enc = DiTPerceptualEncoder(tr, blocks=k)
            with FlopCounterMode(display=False) as fc:
                enc(x, ts, c)
            row[k] = fc.get_total_flops() / u
        out[lat] = row
    return out


def flux_encoder_share(ks=(1, 2, 4, 8, 12, 14, 15, 16, 17, 19), latent_sizes=(16, 64, 128), config=FLUX1_TRANSFORMER,
                       text_tokens: int = 512) -> dict:
    """As `encoder_share` for FLUX.1 (dev: guidance embedding, 512 T5 tokens) with f = ncp.families.flux's encoder."""
    from diffusers import FluxTransformer2DModel

    from ncp.families import flux

    with torch.device("meta"):
        tr = FluxTransformer2DModel(**config)
    tr.requires_grad_(False)
    out = {}
    for lat in latent_sizes:
        x = torch.randn(1, config["in_channels"] // 4, lat, lat, device="meta")
        c = Cond(torch.randn(1, text_tokens, config["joint_attention_dim"], device="meta"),
                 pooled_projections=torch.randn(1, config["pooled_projection_dim"], device="meta"))
        ts = torch.tensor([500.0], device="meta")
        with FlopCounterMode(display=False) as fc:
            flux.denoise(tr, x, ts, c)
        u = fc.get_total_flops()
        row = {"transformer_tflop": u / 1e12}
        for k in ks:
            enc = flux.FluxPerceptualEncoder(tr, blocks=k)
            with FlopCounterMode(display=False) as fc:
                enc(x, ts, c)
            row[k] = fc.get_total_flops() / u
        out[lat] = row
    return out


SHARES = {"sd3": encoder_share, "flux": flux_encoder_share}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SHARES), default="sd3")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    out = SHARES[a.model]()
    ks = [k for k in next(iter(out.values())) if k != "transformer_tflop"]
    print("| latents (px) | transformer TFLOP | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for lat, row in out.items():
        print(f"| {lat}x{lat} ({8 * lat}) | {row['transformer_tflop']:.2f} | "
              + " | ".join(f"{100 * row[k]:.1f}%" for k in ks) + " |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
