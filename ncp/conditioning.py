"""Prompt conditioning exactly as the diffusers SD1.5 / SDXL pipelines compute it.

SD1.5: the CLIP text encoder's last hidden state. SDXL: the penultimate hidden states of both
encoders concatenated, the pooled projection of encoder 2, and `add_time_ids` =
(original size, crop top-left, target size) per image (`StableDiffusionXLPipeline._get_add_time_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Cond:
    encoder_hidden_states: torch.Tensor  # (N, L, D)
    text_embeds: torch.Tensor | None = None  # (N, D2) pooled, SDXL only
    time_ids: torch.Tensor | None = None  # (N, 6), SDXL only

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.text_embeds is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kw

    def _map(self, fn) -> "Cond":
        return Cond(*(None if x is None else fn(x) for x in (self.encoder_hidden_states, self.text_embeds, self.time_ids)))

    def repeat(self, n: int) -> "Cond":
        """[c; c; ...] n times along dim 0 (one prompt for winner and loser)."""
        return self._map(lambda x: x.repeat(n, *([1] * (x.dim() - 1))))

    def cat(self, other: "Cond") -> "Cond":
        parts = [(a, b) for a, b in zip(
            (self.encoder_hidden_states, self.text_embeds, self.time_ids),
            (other.encoder_hidden_states, other.text_embeds, other.time_ids))]
        return Cond(*(None if a is None else torch.cat([a, b]) for a, b in parts))

    def index(self, idx) -> "Cond":
        return self._map(lambda x: x[idx])

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda x: x.to(*args, **kwargs))


@torch.no_grad()
def encode_prompts(models, prompts: list[str]) -> Cond:
    """Text-encoder outputs for a list of prompts, without SDXL time ids."""
    device = models.text_encoders[0].device
    hidden, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        if models.arch == "sd15":
            hidden.append(encoder(ids)[0])
        else:
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # the projection encoder's pooled output (the pipeline keeps the last one)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
    return Cond(torch.cat(hidden, dim=-1), pooled)


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """(N, 6) micro-conditioning: original (h, w), crop (top, left), target (h, w) for each image."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_size), 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target.to(original_size.device)], dim=1)


def build_cond(models, prompts: list[str], original_size=None, crop_top_left=None, target_size=None,
               prompt_embeds=None, pooled_prompt_embeds=None) -> Cond:
    """Conditioning for a batch of B pairs laid out as [winners; losers] (2B rows).

    Prompts (or cached `prompt_embeds`) are per pair and shared by winner and loser; SDXL time ids are
    per image, from `original_size` / `crop_top_left` of shape (2B, 2) and the training resolution.
    """
    if prompt_embeds is None:
        cond = encode_prompts(models, prompts)
    else:
        cond = Cond(prompt_embeds, pooled_prompt_embeds)
    cond = cond.repeat(2)
    if models.arch == "sdxl":
        n = cond.encoder_hidden_states.shape[0]
        if original_size is None:
            original_size = torch.tensor([target_size] * n)
        if crop_top_left is None:
            crop_top_left = torch.zeros(n, 2)
        cond = replace(cond, time_ids=sdxl_time_ids(original_size, crop_top_left, target_size))
    return cond.to(device=models.unet.device, dtype=models.unet.dtype)
