"""Prompt conditioning exactly as the diffusers SD1.5 / SDXL / SD3 pipelines compute it.

SD1.5: the CLIP text encoder's last hidden state. SDXL: the penultimate hidden states of both
encoders concatenated, the pooled projection of encoder 2, and `add_time_ids` =
(original size, crop top-left, target size) per image (`StableDiffusionXLPipeline._get_add_time_ids`).
SD3 (`StableDiffusion3Pipeline.encode_prompt`): both CLIP encoders' penultimate states concatenated and
zero-padded to T5's width, then T5's last state (256 tokens; zeros when the model has no T5) appended along
the sequence; pooled projections = both CLIP projections concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


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


SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: training sees what inference sees


@torch.no_grad()
def encode_sd3_prompts(models, prompts: list[str]) -> Cond:
    """`StableDiffusion3Pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)` (diffusers 0.42)."""
    clip_tokenizers, clip_encoders = models.tokenizers[:2], models.text_encoders[:2]
    t5_tokenizer, t5 = models.tokenizers[2], models.text_encoders[2]
    device, dtype = clip_encoders[0].device, clip_encoders[0].dtype
    hidden, pooled = [], []
    for tokenizer, encoder in zip(clip_tokenizers, clip_encoders):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2].to(dtype))
        pooled.append(out[0])
    width = models.unet.config.joint_attention_dim
    if t5 is None:  # the pipeline's zeros in T5's place
        t5_embeds = torch.zeros(len(prompts), SD3_T5_TOKENS, width, device=device, dtype=dtype)
    else:
        ids = t5_tokenizer(prompts, padding="max_length", max_length=SD3_T5_TOKENS, truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids.to(t5.device)
        t5_embeds = t5(ids)[0].to(device=device, dtype=t5.dtype)
    clip = torch.cat(hidden, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
    return Cond(torch.cat([clip, t5_embeds], dim=-2), pooled_projections=torch.cat(pooled, dim=-1))


@torch.no_grad()
def encode_prompts(models, prompts: list[str]) -> Cond:
    """Text-encoder outputs for a list of prompts, without SDXL time ids."""
    if models.arch == "sd3":
        return encode_sd3_prompts(models, prompts)
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
    elif models.arch == "sd3":
        cond = Cond(prompt_embeds, pooled_projections=pooled_prompt_embeds)
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
