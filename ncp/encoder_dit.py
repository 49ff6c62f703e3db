"""The perceptual encoder f for an MMDiT (SD3 / SD3.5): the frozen base transformer's first stages.

f(x_{t'}, t', c) runs the patch embedding (with its positional embedding), the timestep + pooled-text
embedding, the context embedder and the first K joint transformer blocks, and returns the image tokens'
hidden states after block K (N, tokens, D), or their mean over tokens. This is the transformer's analogue
of the U-Net's down path: the stages that read the noisy latent in the context of the timestep and the
prompt. As the U-Net's f, it runs the transformer's own modules with the LoRA switched off (no copy of the
K blocks: 624M parameters, 2.3 GB fp32, for SD3.5 Medium's 6); share=False, or error=fp32 in a half-precision run, keeps a copy
of these modules only. Its weights never get gradients; gradients flow through its activations. Same interface as
`ncp.encoder.PerceptualEncoder` (forward, jvp, error modes, dtype), so `ncp.objective` uses either.
"""

from __future__ import annotations


import torch
from torch import nn

from .encoder import ERRORS, LINEARIZE, FeatureEncoder, _f_precision, as_base, hold, linearize
from .errors import NcpError

# Default K, measured (docs/sd3.md, benchmarks/RESULTS.md section 4): the first quarter of the joint blocks
# (SD3.5 Medium: 6 of 24), about a quarter of a transformer forward, as the U-Net's down path is ~30% of its.
DEFAULT_BLOCK_FRACTION = 0.25


def default_blocks(num_layers: int) -> int:
    return max(1, round(DEFAULT_BLOCK_FRACTION * num_layers))


class DiTPerceptualEncoder(FeatureEncoder):
    """blocks: K, the number of joint blocks kept (None = `default_blocks`); pool: mean over image tokens.
    error, batch_calls: as PerceptualEncoder's. Build it before LoRA is added. A subclass for another transformer
    names its `embedders`, its `block_kind` and its default K (`_default_k`), and runs them in `_forward`."""

    embedders = ("pos_embed", "time_text_embed", "context_embedder")  # what runs before the blocks
    block_kind = "joint"
    denoiser = "transformer"

    def __init__(self, transformer, blocks: int | None = None, pool: bool = False, error: str = "difference",
                 batch_calls: bool = False, share: bool = True):
        super().__init__()
        if error not in ERRORS:
            raise NcpError(f"encoder.error must be one of {ERRORS}, got {error!r}")
        if any("lora" in name for name, _ in transformer.named_parameters()):
            raise NcpError("build the perceptual encoder from the base transformer before adding LoRA")
        num_layers = len(transformer.transformer_blocks)
        blocks = self._default_k(transformer) if blocks is None else blocks
        if not 1 <= blocks <= num_layers:
            raise NcpError(f"encoder.blocks must be between 1 and the transformer's {num_layers} {self.block_kind} "
                           f"blocks, got {blocks}")
        self.blocks, self.pool, self.error, self.batch_calls = blocks, pool, error, batch_calls
        self.linearize = LINEARIZE[0]  # how jvp runs (a benchmark's switch, not a setting)
        self.config = transformer.config
        modules = {name: getattr(transformer, name) for name in self.embedders}
        modules["transformer_blocks"] = nn.ModuleList(transformer.transformer_blocks[:blocks])
        hold(self, transformer, modules, share)

    @staticmethod
    def _default_k(transformer) -> int:
        return default_blocks(len(transformer.transformer_blocks))

    @classmethod
    def from_config(cls, transformer, encoder_cfg, family: str):
        """f from the `encoder` settings (ncp.config.EncoderConfig): a transformer's f has a depth K, no U-Net features."""
        if encoder_cfg.features != "last":
            raise NcpError(f"encoder.features={encoder_cfg.features!r} is for U-Nets; {family} uses encoder.blocks (K)")
        return cls(transformer, encoder_cfg.blocks, encoder_cfg.pool, encoder_cfg.error, batch_calls=encoder_cfg.batch_calls)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.proj.weight.dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """x: (N, C, h, w) latents; timestep: (N,) the transformer's timestep (sigma * 1000); cond: N rows."""
        with as_base(self._base):
            return self._run(x, timestep, cond)

    def _run(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        if not self.fp32:
            with _f_precision(self.error, self.dtype):
                return self._forward(x, timestep, cond)
        with torch.autocast(x.device.type, enabled=False), _f_precision(self.error, self.dtype):
            return self._forward(x, timestep, cond.to(dtype=torch.float32))

    def jvp(self, x: torch.Tensor, timestep: torch.Tensor, cond, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """[J_f(x) tangent for each tangent] by forward-mode AD, as PerceptualEncoder.jvp (`ncp.encoder.linearize`)."""
        return linearize(lambda x_: self._run(x_, timestep, cond), x, tangents, self.linearize, self._base)

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        # as SD3Transformer2DModel.forward (diffusers 0.42), stopped after block K
        h = self.pos_embed(x.to(self.dtype))
        temb = self.time_text_embed(timestep, cond.pooled_projections.to(self.dtype))
        context = self.context_embedder(cond.encoder_hidden_states.to(self.dtype))
        for block in self.transformer_blocks:
            context, h = self._block(block, h, context, temb)
        return h.mean(dim=1) if self.pool else h
