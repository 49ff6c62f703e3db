"""The perceptual encoder f for an MMDiT (SD3 / SD3.5): a frozen copy of the transformer's first stages.

f(x_{t'}, t', c) runs the patch embedding (with its positional embedding), the timestep + pooled-text
embedding, the context embedder and the first K joint transformer blocks, and returns the image tokens'
hidden states after block K (N, tokens, D), or their mean over tokens. This is the transformer's analogue
of the U-Net's down path: the stages that read the noisy latent in the context of the timestep and the
prompt. Only these modules are copied: no later block, no output norm or projection is kept in memory.
Its weights never get gradients; gradients flow through its activations. Same interface as
`ncp.encoder.PerceptualEncoder` (forward, jvp, error modes, dtype), so `ncp.objective` uses either.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .encoder import ERRORS, _tf32_off
from .errors import NcpError

# Default K, measured (docs/sd3.md, benchmarks/RESULTS.md section 4): the first quarter of the joint blocks
# (SD3.5 Medium: 6 of 24), about a quarter of a transformer forward, as the U-Net's down path is ~30% of its.
DEFAULT_BLOCK_FRACTION = 0.25


def default_blocks(num_layers: int) -> int:
    return max(1, round(DEFAULT_BLOCK_FRACTION * num_layers))


class DiTPerceptualEncoder(nn.Module):
    """blocks: K, the number of joint blocks kept (None = `default_blocks`); pool: mean over image tokens.
    error: as PerceptualEncoder's (difference | linearized | fp32). Build it before LoRA is added."""

    def __init__(self, transformer, blocks: int | None = None, pool: bool = False, error: str = "difference"):
        super().__init__()
        if error not in ERRORS:
            raise NcpError(f"encoder.error must be one of {ERRORS}, got {error!r}")
        if any("lora" in name for name, _ in transformer.named_parameters()):
            raise NcpError("build the perceptual encoder from the base transformer before adding LoRA")
        num_layers = len(transformer.transformer_blocks)
        blocks = default_blocks(num_layers) if blocks is None else blocks
        if not 1 <= blocks <= num_layers:
            raise NcpError(f"encoder.blocks must be between 1 and the transformer's {num_layers} joint blocks, got {blocks}")
        self.blocks, self.pool, self.error = blocks, pool, error
        self.config = transformer.config
        self.pos_embed = copy.deepcopy(transformer.pos_embed)
        self.time_text_embed = copy.deepcopy(transformer.time_text_embed)
        self.context_embedder = copy.deepcopy(transformer.context_embedder)
        self.transformer_blocks = nn.ModuleList(copy.deepcopy(b) for b in transformer.transformer_blocks[:blocks])
        if self.fp32:
            self.float()
        self.requires_grad_(False)
        self.eval()

    @property
    def fp32(self) -> bool:
        return self.error == "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.proj.weight.dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """x: (N, C, h, w) latents; timestep: (N,) the transformer's timestep (sigma * 1000); cond: N rows."""
        if not self.fp32:
            return self._forward(x, timestep, cond)
        with torch.autocast(x.device.type, enabled=False), _tf32_off():
            return self._forward(x, timestep, cond.to(dtype=torch.float32))

    def jvp(self, x: torch.Tensor, timestep: torch.Tensor, cond, tangent: torch.Tensor) -> torch.Tensor:
        """J_f(x) tangent by forward-mode AD, as PerceptualEncoder.jvp (SDPA on its math kernel: the fused
        kernels have no forward-AD formula in PyTorch 2.13)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            _, out = torch.func.jvp(lambda x_: self(x_, timestep, cond), (x.detach().contiguous(),),
                                    (tangent.to(x.dtype).contiguous(),))
        return out

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        # as SD3Transformer2DModel.forward (diffusers 0.42), stopped after block K
        h = self.pos_embed(x.to(self.dtype))
        temb = self.time_text_embed(timestep, cond.pooled_projections.to(self.dtype))
        context = self.context_embedder(cond.encoder_hidden_states.to(self.dtype))
        for block in self.transformer_blocks:
            context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb)
        return h.mean(dim=1) if self.pool else h
