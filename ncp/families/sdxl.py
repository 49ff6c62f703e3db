"""Stable Diffusion XL: SD1.5's U-Net family with two CLIP text encoders, the pooled projection of the second and
per-image micro-conditioning (`StableDiffusionXLPipeline._get_add_time_ids`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .sd15 import SD15, _ids


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
    """(N, 6) micro-conditioning: original (h, w), crop (top, left), target (h, w) for each image."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_size), 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target.to(original_size.device)], dim=1)


class SDXL(SD15):
    name = "sdxl"
    pipeline_name = "StableDiffusionXLPipeline"
    hub_tag = "stable-diffusion-xl"
    id_hints = ("xl",)
    configs = ("sdxl_*.yaml", "tiny_sdxl_*.yaml")
    text_time = True

    def _text_models(self, path, revision, variant, weight_dtype):
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        tokenizers, encoders = super()._text_models(path, revision, variant, weight_dtype)
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=variant,
                                                                    revision=revision, torch_dtype=weight_dtype))
        return tokenizers, encoders

    @torch.no_grad()
    def encode_prompts(self, models, prompts):
        """Both encoders' penultimate hidden states concatenated, and the second's pooled projection
        (`StableDiffusionXLPipeline.encode_prompt`); time ids come per image (`image_conditioning`)."""
        from ..conditioning import Cond

        hidden, pooled = [], None
        for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
            out = encoder(_ids(tokenizer, prompts, models.text_encoders[0].device), output_hidden_states=True)
            if out[0].ndim == 2:  # the projection encoder's pooled output (the pipeline keeps the last one)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return Cond(torch.cat(hidden, dim=-1), pooled)

    def image_conditioning(self, cond, original_size, crop_top_left, target_size):
        n = cond.encoder_hidden_states.shape[0]
        if original_size is None:
            original_size = torch.tensor([target_size] * n)
        if crop_top_left is None:
            crop_top_left = torch.zeros(n, 2)
        return replace(cond, time_ids=sdxl_time_ids(original_size, crop_top_left, target_size))

    def pipeline_extras(self, model_cfg) -> dict:
        return {}

    def _tiny_unet(self, seed: int):
        """Two text encoders (32 + 32 wide), pooled projection 32, six micro-conditioning numbers."""
        from diffusers import UNet2DConditionModel

        from ..tiny import TINY_UNET

        torch.manual_seed(seed)
        return UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
            **TINY_UNET,
        )

    def tiny(self, out_dir, seed=0) -> Path:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        from ..tiny import SCHEDULER_CONFIG, clip_tokenizers, text_encoder, tiny_vae

        with clip_tokenizers(out_dir, 2) as (_, (tokenizer, tokenizer_2)):
            pipe = StableDiffusionXLPipeline(
                vae=tiny_vae(seed), text_encoder=text_encoder(len(tokenizer), False, seed + 1),
                text_encoder_2=text_encoder(len(tokenizer), True, seed + 3), tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=self._tiny_unet(seed + 2),
                scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
            )
            pipe.save_pretrained(out_dir)
        return Path(out_dir)

    def example_cond(self, denoiser, n, size):
        cond = super().example_cond(denoiser, n, size)
        pooled = denoiser.config.projection_class_embeddings_input_dim - 6 * denoiser.config.addition_time_embed_dim
        cond.text_embeds = torch.randn(n, pooled)
        cond.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(n, 1)
        return cond


FAMILY = SDXL()
