"""Stable Diffusion 3 / 3.5: an MMDiT transformer on two CLIP encoders with projection and T5, a 16-channel VAE
with a shift, and flow matching (`ncp.flow.FlowSchedule`, velocity prediction)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NcpError
from ..quantize import quantization_config
from ..models import Models
from .base import Family

# the joint attention's context stream (diffusers train_dreambooth_lora_sd3.py): LoRA'd beside the image stream's
CONTEXT_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: training sees what inference sees
TINY_TRANSFORMER = dict(  # SD3.5-style MMDiT in miniature: 64 image tokens (16x16 latents, patch 2), 4 blocks
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3.5-medium scheduler


class SD3(Family):
    name = "sd3"
    pipeline_name = "StableDiffusion3Pipeline"
    denoiser_key = "transformer"
    denoiser_kind = "transformer"
    quantizes = True
    hub_tag = "stable-diffusion-3"
    id_hints = ("diffusion-3",)
    configs = ("sd3_*.yaml", "tiny_sd3_*.yaml")

    denoiser_class = "SD3Transformer2DModel"

    def load(self, path, vae=None, revision=None, variant=None, weight_dtype=torch.float32, device="cpu",
             text_encoder_3=True, quantize="none") -> Models:
        """text_encoder_3=False drops T5 as `StableDiffusion3Pipeline.from_pretrained(..., text_encoder_3=None,
        tokenizer_3=None)` does (the pipeline then feeds zeros in its place)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw = dict(revision=revision, variant=variant, torch_dtype=weight_dtype)
        t5_kw = dict(kw, quantization_config=quantization_config(quantize, weight_dtype, "transformers"))
        try:
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw,
                quantization_config=quantization_config(quantize, weight_dtype))
        except (OSError, ValueError) as e:
            raise NcpError(f"model.pretrained={path!r}: cannot load an SD3 transformer from it ({e})") from e
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=f, revision=revision) for f in ("tokenizer", "tokenizer_2")]
        text_encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=f, **kw)
                         for f in ("text_encoder", "text_encoder_2")]
        t5, t5_tokenizer = None, None
        if text_encoder_3:
            try:
                t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **t5_kw)
                t5_tokenizer = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", revision=revision)
            except (OSError, ValueError) as e:
                raise NcpError(f"model.pretrained={path!r}: cannot load its T5 (text_encoder_3: {e}); "
                               "model.text_encoder_3=false runs without it") from e
        vae_path, vae_kw = (path, dict(subfolder="vae", revision=revision)) if vae is None else (vae, {})
        vae_config = AutoencoderKL.load_config(vae_path, **vae_kw)
        vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else weight_dtype
        vae_model = AutoencoderKL.from_pretrained(vae_path, variant=variant if vae is None else None,
                                                  torch_dtype=vae_dtype, **vae_kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        return Models(self, transformer, vae_model, [*tokenizers, t5_tokenizer], [*text_encoders, t5], scheduler,
                      str(path)).frozen(device)

    @torch.no_grad()
    def encode_prompts(self, models, prompts):
        """`StableDiffusion3Pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)` (diffusers 0.42):
        both CLIP encoders' penultimate states concatenated and zero-padded to T5's width, then T5's last state
        (256 tokens; zeros when the model has no T5) appended along the sequence; pooled projections = both CLIP
        projections concatenated."""
        from ..conditioning import Cond
        from .sd15 import _ids

        clip_tokenizers, clip_encoders = models.tokenizers[:2], models.text_encoders[:2]
        t5_tokenizer, t5 = models.tokenizers[2], models.text_encoders[2]
        device, dtype = clip_encoders[0].device, clip_encoders[0].dtype
        hidden, pooled = [], []
        for tokenizer, encoder in zip(clip_tokenizers, clip_encoders):
            out = encoder(_ids(tokenizer, prompts, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(dtype))
            pooled.append(out[0])
        width = models.denoiser.config.joint_attention_dim
        if t5 is None:  # the pipeline's zeros in T5's place
            t5_embeds = torch.zeros(len(prompts), T5_TOKENS, width, device=device, dtype=dtype)
        else:
            ids = t5_tokenizer(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids.to(t5.device)
            t5_embeds = t5(ids)[0].to(device=device, dtype=t5.dtype)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return Cond(torch.cat([clip, t5_embeds], dim=-2), pooled_projections=torch.cat(pooled, dim=-1))

    def cached_cond(self, prompt_embeds, pooled):
        from ..conditioning import Cond

        return Cond(prompt_embeds, pooled_projections=pooled)

    def noise_process(self, scheduler, objective_cfg, resolution=None):
        from ..flow import FlowSchedule

        return FlowSchedule.from_scheduler(scheduler, objective_cfg.flow_step)

    def encoder(self, denoiser, encoder_cfg):
        """f = the patch, time and text embeddings and the first encoder.blocks joint blocks (default a quarter)."""
        from ..encoder_dit import DiTPerceptualEncoder

        return DiTPerceptualEncoder.from_config(denoiser, encoder_cfg, self.name)

    def lora_targets(self, denoiser, targets):
        """The default (image-stream) targets gain the context stream's projections, so both streams of every joint
        block train. The last joint block is context_pre_only: its context queries' output is discarded, so a LoRA
        there could never get a gradient."""
        from ..models import LORA_TARGETS

        targets = list(targets)
        if targets == list(LORA_TARGETS):
            targets += list(CONTEXT_TARGETS)
        exclude = [f"transformer_blocks.{i}.attn.add_q_proj" for i, b in enumerate(denoiser.transformer_blocks)
                   if b.context_pre_only]
        return targets, exclude or None

    def lora_state_dict(self, denoiser):
        """peft format, as diffusers' SD3 LoRA scripts save it."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    def sampling_scheduler(self, scheduler_config):
        """The model's own flow-matching scheduler."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def pipeline_extras(self, model_cfg) -> dict:
        return {} if model_cfg.text_encoder_3 else dict(text_encoder_3=None, tokenizer_3=None)  # T5 may be None

    def tiny(self, out_dir, seed=0) -> Path:
        """SD3.5-style: 4 joint blocks (qk RMS-norm, a dual-attention first block), two CLIP encoders with
        projection, a T5 encoder with a locally built tokenizer, a 16-channel VAE with SD3's shift and scale and
        SD3's flow-matching scheduler (shift 3); 16x16x16 latents. T5 included (model.text_encoder_3=false drops it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import T5TokenizerFast

        from ..tiny import clip_tokenizers, t5_encoder, text_encoder, tiny_vae, write_t5_tokenizer

        with clip_tokenizers(out_dir, 2) as (tok_dir, (tokenizer, tokenizer_2)):
            write_t5_tokenizer(tok_dir / "3")
            tokenizer_3 = T5TokenizerFast.from_pretrained(tok_dir / "3")
            # SD3's VAE: 16 channels, latents = (z - shift_factor) * scaling_factor, no quant convs
            vae = tiny_vae(seed, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                           use_post_quant_conv=False)
            t5 = t5_encoder(len(tokenizer_3), seed + 4)
            text_encoders = [text_encoder(len(tokenizer), True, seed + 1), text_encoder(len(tokenizer), True, seed + 3)]
            torch.manual_seed(seed + 2)
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**TINY_TRANSFORMER),
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1],
                tokenizer_2=tokenizer_2, text_encoder_3=t5, tokenizer_3=tokenizer_3,
            )
            pipe.save_pretrained(out_dir)
        return Path(out_dir)

    def example_cond(self, denoiser, n, size):
        from ..conditioning import Cond

        c = denoiser.config
        return Cond(torch.randn(n, 77 + T5_TOKENS, c.joint_attention_dim),
                    pooled_projections=torch.randn(n, c.pooled_projection_dim))


FAMILY = SD3()
