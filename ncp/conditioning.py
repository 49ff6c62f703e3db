"""Prompt conditioning: `Cond`, the denoiser's conditioning tensors, and the batch's conditioning built by the
model's family exactly as its diffusers pipeline computes it (`Family.encode_prompts`, `Family.image_conditioning`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """x on `device`; a host tensor's copy to a GPU does not wait for the GPU (from pinned memory, non-blocking), so
    a micro-step's inputs cost no sync. The caching host allocator keeps the pinned block until the copy is done."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    return x.to(device)


@dataclass
class Cond:
    encoder_hidden_states: torch.Tensor  # (N, L, D)
    text_embeds: torch.Tensor | None = None  # (N, D2) pooled, SDXL only
    time_ids: torch.Tensor | None = None  # (N, 6), SDXL only
    pooled_projections: torch.Tensor | None = None  # (N, D2) both CLIP projections, SD3 only

    @property
    def pooled(self) -> torch.Tensor | None:
        """The pooled text embedding (SDXL's text_embeds or SD3's pooled projections), as the latent cache stores it."""
        return self.text_embeds if self.pooled_projections is None else self.pooled_projections

    def unet_kwargs(self) -> dict:
        """The denoiser's conditioning kwargs: a U-Net's, or an SD3 transformer's (with pooled projections)."""
        kw = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        if self.pooled_projections is not None:
            kw["pooled_projections"] = self.pooled_projections
        return kw

    def _tensors(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def _map(self, fn) -> "Cond":
        return Cond(*(None if x is None else fn(x) for x in self._tensors()))

    def repeat(self, n: int) -> "Cond":
        """[c; c; ...] n times along dim 0 (one prompt for winner and loser)."""
        return self._map(lambda x: x.repeat(n, *([1] * (x.dim() - 1))))

    def cat(self, other: "Cond") -> "Cond":
        parts = [(a, b) for a, b in zip(self._tensors(), other._tensors())]
        return Cond(*(None if a is None else torch.cat([a, b]) for a, b in parts))

    def index(self, idx) -> "Cond":
        return self._map(lambda x: x[idx])

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda x: x.to(*args, **kwargs))


@torch.no_grad()
def encode_prompts(models, prompts: list[str]) -> Cond:
    """Text-encoder outputs for a list of prompts as the family's pipeline computes them (without SDXL time ids)."""
    return models.family.encode_prompts(models, prompts)


def build_cond(models, prompts: list[str], original_size=None, crop_top_left=None, target_size=None,
               prompt_embeds=None, pooled_prompt_embeds=None) -> Cond:
    """Conditioning for a batch of B pairs laid out as [winners; losers] (2B rows).

    Prompts (or cached `prompt_embeds`) are per pair and shared by winner and loser; per-image conditioning (SDXL's
    time ids) comes from `original_size` / `crop_top_left` of shape (2B, 2) and the training resolution.
    """
    family = models.family
    if prompt_embeds is None:
        cond = encode_prompts(models, prompts)
    else:
        cond = family.cached_cond(prompt_embeds, pooled_prompt_embeds)
    cond = family.image_conditioning(cond.repeat(2), original_size, crop_top_left, target_size)
    return cond._map(lambda x: to_device(x, models.denoiser.device).to(models.denoiser.dtype))
