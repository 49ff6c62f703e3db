"""FLUX.1 [dev] and [schnell]: rectified-flow MMDiT (19 double-stream + 38 single-stream blocks), CLIP-L pooled +
T5 conditioning, 16-channel VAE latents packed into 2x2 patches.

Everything FLUX-specific lives here; the maths (ncp.flow, ncp.objective, ncp.losses) is SD3's:
- conditioning = `FluxPipeline.encode_prompt`: T5's last hidden state (max_sequence_length 512 for dev, 256 for
  schnell, the pipelines' and diffusers' training defaults) and CLIP-L's pooled output;
- latents stay (B, 16, h, w) everywhere (objective, cache, flow step); `denoise` packs them into 2x2 patches
  (`FluxPipeline._pack_latents`), builds the image and text position ids as the pipeline does, and unpacks v;
- dev is guidance-distilled: the transformer takes `guidance` (3.5, diffusers' FLUX LoRA training default);
  schnell has no guidance embedding and a guidance setting is refused. The run's guidance and T5 length
  (model.guidance, model.max_sequence_length) are `Settings` that `Flux.configure` attaches to the transformer, so
  every call on it (denoiser, f, prompts) agrees; a transformer without them has its variant's defaults;
- timesteps: the noise process is SD3's (`FlowSchedule`, model timestep = the scheduler's sigma * 1000); the
  denoiser call passes timestep / 1000 = sigma, as FluxPipeline and diffusers' FLUX training script do. The training
  discretisation is the scheduler's unshifted sigmas (diffusers' FLUX training scripts: dev's scheduler has
  use_dynamic_shifting, schnell's shift 1); flow_shift="resolution" applies the pipeline's resolution-dependent
  shift (mu from (data.resolution / 16)^2 image tokens, `calculate_shift`) instead;
- f = the embedders (x_embedder, time/guidance/text embedding, context embedder, rotary position embedding) and
  the first K double-stream blocks of the base transformer, run with the LoRA off; no single-stream block,
  no output norm or projection;
- LoRA on both attention streams and both feed-forwards (diffusers' train_dreambooth_lora_flux.py targets),
  saved as `transformer_lora_layers` for `FluxPipeline.load_lora_weights`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..encoder_dit import DiTPerceptualEncoder
from ..errors import NcpError
from ..quantize import quantization_config
from ..flow import SHIFTS, STEPS, FlowSchedule
from ..models import Models
from .base import Family

VARIANTS = ("dev", "schnell")
VAE_SCALE = 8  # FLUX.1's VAE (every variant's): 8x down; the tiny one is built alike
GUIDANCE = 3.5  # diffusers train_dreambooth_lora_flux.py --guidance_scale default, and FluxPipeline's
T5_TOKENS = {"dev": 512, "schnell": 256}  # FluxPipeline's max_sequence_length default / its schnell example
# diffusers examples/dreambooth/train_dreambooth_lora_flux.py default targets: both attention streams (the
# "attn.to_*" names also match the single-stream blocks' q, k, v) and both feed-forwards of the double blocks
TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


# -- variant, detection, loading ---------------------------------------------------------------------------------
def variant(transformer) -> str:
    """"dev" (guidance-distilled: the transformer embeds a guidance scale) or "schnell" (it does not)."""
    return "dev" if transformer.config.guidance_embeds else "schnell"


def max_sequence_length(transformer, value: int | None = None) -> int:
    """T5 tokens: `value`, or the variant's pipeline default (dev 512, schnell 256)."""
    if value is None:
        return T5_TOKENS[variant(transformer)]
    if not 1 <= value <= 512:
        raise NcpError(f"model.max_sequence_length must be between 1 and 512 (FluxPipeline's limit), got {value}")
    return value


def guidance(transformer, value: float | None = None) -> float | None:
    """The guidance scale the transformer is trained at: dev `value` or 3.5; schnell has no guidance embedding,
    so a value there is refused rather than silently ignored."""
    if variant(transformer) == "dev":
        return GUIDANCE if value is None else float(value)
    if value is not None:
        raise NcpError(f"model.guidance={value}: FLUX.1 schnell has no guidance embedding; leave model.guidance unset")
    return None


@dataclass(frozen=True)
class Settings:
    """What a FLUX run fixes beside the weights: the embedded guidance scale (None for schnell) and the T5 length."""
    guidance: float | None
    max_sequence_length: int


def apply_settings(transformer, guidance_scale: float | None = None, max_length: int | None = None) -> Settings:
    """Validate model.guidance / model.max_sequence_length for this transformer and attach them to it."""
    s = Settings(guidance(transformer, guidance_scale), max_sequence_length(transformer, max_length))
    transformer.ncp_flux = s
    return s


def settings(denoiser) -> Settings:
    """The run's Settings of a (possibly DDP-wrapped or compiled) FLUX transformer; the variant's defaults if unset."""
    base = getattr(denoiser, "module", denoiser)
    base = getattr(base, "_orig_mod", base)
    found = base.__dict__.get("ncp_flux")
    return found if found is not None else Settings(guidance(base), max_sequence_length(base))


# -- conditioning --------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(models, prompts: list[str]):
    """`FluxPipeline.encode_prompt(prompts, max_sequence_length=L)` (diffusers 0.42), L the run's T5 length: T5's
    last hidden state (B, L, 4096) as encoder_hidden_states and CLIP-L's pooled output (B, 768) as
    pooled_projections. The text position ids are all zero (`text_ids`), so they are not stored."""
    from ..conditioning import Cond

    (clip_tokenizer, t5_tokenizer), (clip, t5) = models.tokenizers, models.text_encoders
    length = settings(models.unet).max_sequence_length
    device = clip.device
    ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    pooled = clip(ids.to(device), output_hidden_states=False).pooler_output.to(dtype=clip.dtype, device=device)
    ids = t5_tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    hidden = t5(ids.to(t5.device), output_hidden_states=False)[0].to(dtype=t5.dtype, device=device)
    return Cond(hidden, pooled_projections=pooled)


# -- latents: 2x2 packing and position ids -------------------------------------------------------------------------
def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): `FluxPipeline._pack_latents`."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w): `FluxPipeline._unpack_latents` for latents of size h x w."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed latent tokens (0, row, column):
    `FluxPipeline._prepare_latent_image_ids(_, h // 2, w // 2, ...)`."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype=None) -> torch.Tensor:
    """(L, 3) zeros: the text tokens' position ids, as `FluxPipeline.encode_prompt` returns them."""
    return torch.zeros(length, 3).to(device=device, dtype=dtype)


def _inputs(transformer, x: torch.Tensor, timestep: torch.Tensor, cond, guidance_scale: float | None) -> dict:
    """The transformer's keyword inputs for unpacked latents x (B, C, h, w) at the flow process's timestep
    (B,) = sigma * 1000: the pipeline's `timestep / 1000`, packed latents, guidance and ids."""
    n, (h, w) = x.shape[0], x.shape[-2:]
    if (h % 2) or (w % 2):
        raise NcpError(f"FLUX packs latents into 2x2 patches: latent size {h}x{w} must be even "
                       "(data.resolution a multiple of 16)")
    g = None
    if guidance_scale is not None:  # the pipeline's torch.full([1], scale, float32).expand(B)
        g = torch.full([1], guidance_scale, device=x.device, dtype=torch.float32).expand(n)
    ehs = cond.encoder_hidden_states
    return dict(hidden_states=pack_latents(x), timestep=timestep / 1000, guidance=g,
                pooled_projections=cond.pooled_projections, encoder_hidden_states=ehs,
                txt_ids=text_ids(ehs.shape[1], x.device, ehs.dtype), img_ids=image_ids(h, w, x.device, ehs.dtype))


def denoise(transformer, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
    """v = transformer(pack(x), timestep / 1000, the run's guidance, ...), unpacked to x's (B, C, h, w);
    timestep = sigma * 1000, the flow process's `model_timestep`."""
    inputs = _inputs(transformer, x, timestep, cond, settings(transformer).guidance)
    return unpack_latents(transformer(**inputs, return_dict=False)[0], *x.shape[-2:])


# -- noise process -------------------------------------------------------------------------------------------------
def mu(scheduler, resolution: int) -> float:
    """The pipeline's resolution-dependent shift for square images of `resolution` px: image sequence length
    (resolution / 16)^2 (the VAE's 8x, then 2x2 packing), through `calculate_shift` with the scheduler's bounds."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    return calculate_shift((resolution // (2 * VAE_SCALE)) ** 2, c.get("base_image_seq_len", 256),
                           c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))


def schedule(scheduler, step: str = "ode", shift: str = "none", resolution: int | None = None) -> FlowSchedule:
    """The training discretisation: the scheduler's N sigmas as loaded (dev: unshifted, use_dynamic_shifting;
    schnell: shift 1), as diffusers' FLUX training scripts sample them; shift="resolution": those sigmas through
    the pipeline's shift at the run's resolution (`set_timesteps(sigmas=..., mu=...)`). Model timesteps are the
    scheduler's (sigma * 1000), as for SD3; `denoise` passes them / 1000."""
    if step not in STEPS:
        raise NcpError(f"objective.flow_step must be one of {STEPS}, got {step!r}")
    if shift not in SHIFTS:
        raise NcpError(f"objective.flow_shift must be one of {SHIFTS}, got {shift!r}")
    if shift == "resolution":
        if not scheduler.config.get("use_dynamic_shifting", False):
            raise NcpError("objective.flow_shift=resolution needs a scheduler with use_dynamic_shifting (FLUX.1 dev); "
                           "this one's sigmas are fixed (schnell: shift 1); use objective.flow_shift=none")
        if resolution is None:
            raise NcpError("objective.flow_shift=resolution needs the run's resolution (data.resolution)")
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(sigmas=scheduler.sigmas.numpy(), mu=mu(scheduler, resolution))
        sigmas, timesteps = scheduler.sigmas[:-1], scheduler.timesteps
    else:
        sigmas, timesteps = scheduler.sigmas, scheduler.timesteps
    return FlowSchedule.from_sigmas(sigmas, timesteps, step)


# -- perceptual encoder f -----------------------------------------------------------------------------------------
# Default K, measured (benchmarks/RESULTS.md section 8): f's FLOP share matches the U-Net down path's (~27-30% of
# a forward, as SD3's K = 6 of 24): a FLUX.1 double block costs as much as a single one, and K = 16 of the 19
# double blocks is 28.1% of a FLUX.1 forward at 128-1024 px.
DEFAULT_BLOCK_FRACTION = 16 / 57


def default_blocks(transformer) -> int:
    """K for this transformer: the same share of all (double + single) blocks as FLUX.1's 16 of 57."""
    c = transformer.config
    return max(1, min(c.num_layers, round(DEFAULT_BLOCK_FRACTION * (c.num_layers + c.num_single_layers))))


class FluxPerceptualEncoder(DiTPerceptualEncoder):
    """f for FLUX: embedders + the first K double-stream blocks of the base transformer; returns the image tokens'
    hidden states after block K (N, h/2 * w/2, D), or their mean (pool). The DiT encoder's interface and sharing
    (forward(x, timestep, cond) with x unpacked (N, C, h, w) and the flow timestep sigma * 1000, jvp, error modes;
    the transformer's own modules with its LoRA off, or a copy). It takes the guidance the denoiser takes (the
    transformer's `settings`)."""

    embedders = ("x_embedder", "time_text_embed", "context_embedder", "pos_embed")
    block_kind = "double-stream"

    def __init__(self, transformer, blocks: int | None = None, pool: bool = False, error: str = "difference",
                 batch_calls: bool = False, share: bool = True):
        super().__init__(transformer, blocks, pool, error, batch_calls, share)
        self.guidance_scale = settings(transformer).guidance

    @staticmethod
    def _default_k(transformer) -> int:
        return default_blocks(transformer)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.bias.dtype  # not the weight's: model.quantize stores it in 8 / 4 bits

    def _forward(self, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        # as FluxTransformer2DModel.forward (diffusers 0.42), stopped after double block K
        inputs = _inputs(self, x.to(self.dtype), timestep, cond.to(dtype=self.dtype), self.guidance_scale)
        h = self.x_embedder(inputs["hidden_states"])
        ts = inputs["timestep"].to(h.dtype) * 1000
        pooled = inputs["pooled_projections"]
        if inputs["guidance"] is None:
            temb = self.time_text_embed(ts, pooled)
        else:
            temb = self.time_text_embed(ts, inputs["guidance"].to(h.dtype) * 1000, pooled)
        context = self.context_embedder(inputs["encoder_hidden_states"])
        rope = self.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]], dim=0))
        for block in self.transformer_blocks:
            context, h = self._block(block, h, context, temb, rope)
        return h.mean(dim=1) if self.pool else h


# -- tiny offline pipeline -----------------------------------------------------------------------------------------
TINY_TRANSFORMER = dict(  # FLUX.1 in miniature: 4 double + 4 single blocks; 8x VAE, so 32 px = 4x4 latents = 4 tokens
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=4, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=96, pooled_projection_dim=32, axes_dims_rope=(2, 2, 4),
)
# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler configs
SCHEDULER_CONFIGS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}


def build_tiny(out_dir: str | Path, variant_: str = "dev", seed: int = 0) -> Path:
    """A complete tiny FluxPipeline folder: CLIP (pooled) + T5 (locally built tokenizer), a FLUX transformer with
    guidance_embeds for dev and without for schnell, a 16-channel VAE with FLUX.1's shift and scale and the
    variant's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5TokenizerFast

    from ..tiny import clip_tokenizers, t5_encoder, text_encoder, tiny_vae, write_t5_tokenizer

    if variant_ not in VARIANTS:
        raise NcpError(f"variant must be one of {VARIANTS}, got {variant_!r}")
    with clip_tokenizers(out_dir, 1) as (tok_dir, (tokenizer,)):
        write_t5_tokenizer(tok_dir / "2")
        tokenizer_2 = T5TokenizerFast.from_pretrained(tok_dir / "2")
        vae = tiny_vae(seed, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                       use_post_quant_conv=False, block_out_channels=(16, 32, 32, 32),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        encoders = text_encoder(len(tokenizer), False, seed + 1), t5_encoder(len(tokenizer_2), seed + 4)
        torch.manual_seed(seed + 2)
        FluxPipeline(
            transformer=FluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embeds=variant_ == "dev"),
            scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIGS[variant_]), vae=vae,
            text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1], tokenizer_2=tokenizer_2,
        ).save_pretrained(out_dir)
    return Path(out_dir)


# -- the family ------------------------------------------------------------------------------------------------------
class Flux(Family):
    """FLUX.1 dev / schnell. tokenizers / text_encoders are [CLIP, T5]; the denoiser is the FluxTransformer2DModel,
    carrying the run's `Settings` (`configure`)."""

    name = "flux"
    pipeline_name = "FluxPipeline"
    denoiser_key = "transformer"
    denoiser_kind = "transformer"
    quantizes = True
    hub_tag = "flux"
    id_hints = ("flux",)
    configs = ("flux_*.yaml", "tiny_flux_*.yaml")
    setting_keys = ("model.guidance", "model.max_sequence_length", "objective.flow_shift")
    variants = VARIANTS

    denoiser_class = "FluxTransformer2DModel"

    def load(self, path, vae=None, revision=None, variant=None, weight_dtype=torch.float32, device="cpu",
             text_encoder_3=True, quantize="none") -> Models:
        """Transformer (the variant's default `Settings` until `configure`), CLIP-L, T5, the 16-channel VAE and the
        flow-matching scheduler."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kw = dict(revision=revision, variant=variant, torch_dtype=weight_dtype)
        t5_kw = dict(kw, quantization_config=quantization_config(quantize, weight_dtype, "transformers"))
        try:
            transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **kw,
                quantization_config=quantization_config(quantize, weight_dtype))
        except (OSError, ValueError) as e:
            raise NcpError(f"model.pretrained={path!r}: cannot load a FLUX transformer from it ({e})") from e
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
                      T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", revision=revision)]
        text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                         T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **t5_kw)]
        vae_path, vae_kw = (path, dict(subfolder="vae", revision=revision)) if vae is None else (vae, {})
        vae_dtype = torch.float32 if AutoencoderKL.load_config(vae_path, **vae_kw).get("force_upcast") else weight_dtype
        vae_model = AutoencoderKL.from_pretrained(vae_path, variant=variant if vae is None else None,
                                                  torch_dtype=vae_dtype, **vae_kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        return Models(self, transformer, vae_model, tokenizers, text_encoders, scheduler, str(path)).frozen(device)

    def configure(self, models, cfg) -> None:
        """model.guidance and model.max_sequence_length onto the transformer (`apply_settings`), checked against a
        latent cache's T5 length; the resolution shift counts image tokens with FLUX.1's VAE, so it is refused for
        another."""
        super().configure(models, cfg)
        self.apply_model_settings(models.denoiser, cfg.model)
        length = settings(models.denoiser).max_sequence_length
        prompts = Path(cfg.data.cache_dir or "") / "prompts-00000.safetensors"  # ncp.data.cache's text shard
        if cfg.data.cache_dir and prompts.is_file():
            from safetensors import safe_open

            with safe_open(str(prompts), "pt") as f:
                cached = f.get_slice("prompt_embeds").get_shape()[1]
            if cached != length:
                raise NcpError(f"data.cache_dir={cfg.data.cache_dir} holds T5 embeddings of {cached} tokens but "
                               f"model.max_sequence_length is {length}; build the cache with "
                               f"`python -m ncp.data.cache --max-sequence-length {length}` or train with "
                               f"model.max_sequence_length={cached}")
        if cfg.objective.flow_shift == "resolution" and models.vae_scale_factor != VAE_SCALE:
            raise NcpError(f"objective.flow_shift=resolution counts image tokens with FLUX.1's {VAE_SCALE}x VAE; "
                           f"this VAE downsamples {models.vae_scale_factor}x")

    def apply_model_settings(self, denoiser, model_cfg) -> None:
        apply_settings(denoiser, model_cfg.guidance, model_cfg.max_sequence_length)

    def encode_prompts(self, models, prompts):
        return encode_prompts(models, prompts)

    def sampling_kwargs(self, denoiser) -> dict:
        """The run's T5 length (FluxPipeline's call would encode 512 tokens: schnell trains at 256)."""
        return {"max_sequence_length": settings(denoiser).max_sequence_length}

    def latent_channels(self, denoiser) -> int:
        """in_channels counts 2x2-packed channels."""
        return denoiser.config.in_channels // 4

    def cached_cond(self, prompt_embeds, pooled):
        from ..conditioning import Cond

        return Cond(prompt_embeds, pooled_projections=pooled)

    def noise_process(self, scheduler, objective_cfg, resolution=None):
        return schedule(scheduler, objective_cfg.flow_step, objective_cfg.flow_shift, resolution)

    @staticmethod
    def denoise(denoiser, x_t, timestep, cond):
        return denoise(denoiser, x_t, timestep, cond)

    def encoder(self, denoiser, encoder_cfg):
        """f = the embedders and the first encoder.blocks double-stream blocks (default 16 of FLUX.1's 19)."""
        return FluxPerceptualEncoder.from_config(denoiser, encoder_cfg, self.name)

    def lora_targets(self, denoiser, targets):
        """The default lora.targets become diffusers' FLUX targets (`TARGETS`); an explicit list is kept."""
        from ..models import LORA_TARGETS

        return list(TARGETS if list(targets) == list(LORA_TARGETS) else targets), None

    def lora_state_dict(self, denoiser):
        """peft format, as diffusers' FLUX LoRA script saves it (`transformer_lora_layers`)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    def sampling_scheduler(self, scheduler_config):
        """The model's own flow-matching scheduler (the pipeline sets its resolution shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def tiny(self, out_dir, seed=0, variant="dev") -> Path:
        """4 double + 4 single blocks, an 8x VAE; dev (guidance embedding, dynamic shifting) or schnell."""
        return build_tiny(out_dir, variant, seed)

    def example_cond(self, denoiser, n, size):
        from ..conditioning import Cond

        c = denoiser.config
        return Cond(torch.randn(n, settings(denoiser).max_sequence_length, c.joint_attention_dim),
                    pooled_projections=torch.randn(n, c.pooled_projection_dim))


FAMILY = Flux()
