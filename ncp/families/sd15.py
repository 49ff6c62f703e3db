"""Stable Diffusion 1.x / 2.x: a U-Net with cross-attention on one CLIP text encoder, DDPM (epsilon-prediction)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NcpError
from ..models import Models
from .base import Family


class SD15(Family):
    name = "sd15"
    pipeline_name = "StableDiffusionPipeline"
    hub_tag = "stable-diffusion"
    configs = ("sd15_*.yaml", "tiny_sd15_*.yaml", "quickstart_*.yaml")
    text_time = False  # SDXL's U-Nets take pooled text + micro-conditioning (addition_embed_type="text_time")

    denoiser_class = "UNet2DConditionModel"

    def claims(self, config: dict) -> bool:
        return super().claims(config) and (config.get("addition_embed_type") == "text_time") == self.text_time

    # -- loading -----------------------------------------------------------------------------------------------
    def _text_models(self, path, revision, variant, weight_dtype):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, revision=revision,
                                                torch_dtype=weight_dtype)
        return [tokenizer], [encoder]

    def load(self, path, vae=None, revision=None, variant=None, weight_dtype=torch.float32, device="cpu",
             text_encoder_3=True, quantize="none") -> Models:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, revision=revision,
                                                        torch_dtype=weight_dtype)
        except (OSError, ValueError) as e:
            raise NcpError(f"model.pretrained={path!r}: cannot load a diffusers U-Net from it ({e})") from e
        tokenizers, text_encoders = self._text_models(path, revision, variant, weight_dtype)
        # dtypes are set at load time: diffusers warns about casting a loaded model with `.to(dtype)`
        vae_path, vae_kw = (path, dict(subfolder="vae", variant=variant, revision=revision)) if vae is None else (vae, {})
        vae_config = AutoencoderKL.load_config(vae_path, **{k: v for k, v in vae_kw.items() if k != "variant"})
        vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else weight_dtype
        vae_model = AutoencoderKL.from_pretrained(vae_path, torch_dtype=vae_dtype, **vae_kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        return Models(self, unet, vae_model, tokenizers, text_encoders, scheduler, str(path)).frozen(device)

    # -- conditioning ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, models, prompts):
        """The CLIP text encoder's last hidden state (`StableDiffusionPipeline.encode_prompt`, clip_skip=None)."""
        from ..conditioning import Cond

        tokenizer, encoder = models.tokenizers[0], models.text_encoders[0]
        return Cond(encoder(_ids(tokenizer, prompts, encoder.device))[0])

    # -- the noise process and f -------------------------------------------------------------------------------
    def noise_process(self, scheduler, objective_cfg, resolution=None):
        from ..diffusion import Schedule

        return Schedule.from_scheduler(scheduler)

    def encoder(self, denoiser, encoder_cfg):
        """f = the U-Net's time embedding, conv_in and down blocks (encoder.features: the last down block's output
        by default)."""
        from ..encoder import PerceptualEncoder

        return PerceptualEncoder(denoiser, encoder_cfg.features, encoder_cfg.pool, encoder_cfg.error,
                                 batch_calls=encoder_cfg.batch_calls)

    def pipeline_extras(self, model_cfg) -> dict:
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    # -- tests and benchmarks ----------------------------------------------------------------------------------
    def _tiny_unet(self, seed: int):
        from diffusers import UNet2DConditionModel

        from ..tiny import TINY_UNET

        torch.manual_seed(seed)
        return UNet2DConditionModel(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    **TINY_UNET)

    def tiny(self, out_dir, seed=0) -> Path:
        from diffusers import PNDMScheduler, StableDiffusionPipeline

        from ..tiny import SCHEDULER_CONFIG, clip_tokenizers, text_encoder, tiny_vae

        with clip_tokenizers(out_dir, 1) as (_, (tokenizer,)):
            pipe = StableDiffusionPipeline(
                vae=tiny_vae(seed), text_encoder=text_encoder(len(tokenizer), False, seed + 1), tokenizer=tokenizer,
                unet=self._tiny_unet(seed + 2),
                scheduler=PNDMScheduler.from_config({**SCHEDULER_CONFIG, "skip_prk_steps": True}),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            pipe.save_pretrained(out_dir)
        return Path(out_dir)

    def example_cond(self, denoiser, n, size):
        from ..conditioning import Cond

        return Cond(torch.randn(n, 77, denoiser.config.cross_attention_dim))


FAMILY = SD15()


def _ids(tokenizer, prompts, device):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)
