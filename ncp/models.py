"""Loading the frozen parts of SD1.5 / SDXL / SD3 and the trainable LoRA on the denoiser.

One denoiser serves as policy (LoRA on) and reference (LoRA off, see `adapters_disabled`), so the
reference costs no extra memory. The denoiser is a U-Net (sd15, sdxl) or an MMDiT transformer (sd3);
`Models.unet` holds either, and `Models.arch` says which. Frozen weights are cast to the half precision of the run;
trainable LoRA weights stay fp32 (diffusers `cast_training_params`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NcpError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name; load_lora_weights(dir) finds it
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as the authors and diffusers' DPO example
# SD3's joint attention: the image stream's projections and the context stream's (diffusers train_dreambooth_lora_sd3.py)
SD3_CONTEXT_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ARCHS = ("sd15", "sdxl", "sd3")


@dataclass
class Models:
    arch: str  # "sd15", "sdxl" or "sd3"
    unet: torch.nn.Module  # the denoiser: UNet2DConditionModel, or SD3Transformer2DModel for sd3
    vae: torch.nn.Module
    tokenizers: list  # sd3: [CLIP, CLIP, T5 or None]
    text_encoders: list  # sd3: [CLIP with projection, CLIP with projection, T5 encoder or None]
    scheduler: object  # DDPMScheduler built from the model's own scheduler config; sd3: FlowMatchEulerDiscreteScheduler
    path: str = ""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def detect_arch(unet_config) -> str:
    """SDXL U-Nets take pooled text + micro-conditioning through `addition_embed_type="text_time"`."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def to_latents(vae, mean: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean -> the latents the denoiser was trained on: mean * scaling_factor, and for SD3's VAE
    (mean - shift_factor) * scaling_factor (StableDiffusion3Pipeline decodes latents / scale + shift)."""
    shift = vae.config.get("shift_factor")
    if shift is None:
        return mean * vae.config.scaling_factor
    return (mean - shift) * vae.config.scaling_factor


def _is_sd3(path: str, revision: str | None) -> bool:
    """Whether the pipeline folder's `transformer/` holds an SD3Transformer2DModel."""
    from diffusers import SD3Transformer2DModel

    try:
        config = SD3Transformer2DModel.load_config(path, subfolder="transformer", revision=revision)
    except (OSError, ValueError):
        return False
    return config.get("_class_name") == "SD3Transformer2DModel"


def load_sd3_models(path: str, revision: str | None = None, variant: str | None = None,
                    weight_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    text_encoder_3: bool = True) -> Models:
    """SD3 / SD3.5: MMDiT transformer, 16-channel VAE, two CLIP encoders with projection, T5 and the
    flow-matching scheduler. text_encoder_3=False drops T5 as `StableDiffusion3Pipeline.from_pretrained(...,
    text_encoder_3=None, tokenizer_3=None)` does (the pipeline then feeds zeros in its place)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    kw = dict(revision=revision, variant=variant, torch_dtype=weight_dtype)
    try:
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kw)
    except (OSError, ValueError) as e:
        raise NcpError(f"model.pretrained={path!r}: cannot load an SD3 transformer from it ({e})") from e
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=f, revision=revision) for f in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=f, **kw)
                     for f in ("text_encoder", "text_encoder_2")]
    t5, t5_tokenizer = None, None
    if text_encoder_3:
        try:
            t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw)
            t5_tokenizer = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", revision=revision)
        except (OSError, ValueError) as e:
            raise NcpError(f"model.pretrained={path!r}: cannot load its T5 (text_encoder_3: {e}); "
                           "model.text_encoder_3=false runs without it") from e
    vae_config = AutoencoderKL.load_config(path, subfolder="vae", revision=revision)
    vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else weight_dtype
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant, torch_dtype=vae_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    for m in [transformer, vae, *[e for e in text_encoders if e is not None], *([t5] if t5 is not None else [])]:
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    return Models("sd3", transformer, vae, [*tokenizers, t5_tokenizer], [*text_encoders, t5], scheduler, str(path))


def load_models(
    path: str, arch: str | None = None, vae: str | None = None, revision: str | None = None,
    variant: str | None = None, weight_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    text_encoder_3: bool = True,
) -> Models:
    """Load U-Net, VAE, tokenizer(s), text encoder(s) and a DDPM scheduler from a hub id or local folder.

    `vae` overrides the pipeline's VAE (e.g. `madebyollin/sdxl-vae-fp16-fix`). A VAE whose config asks for
    `force_upcast` (the stock SDXL VAE, which overflows in fp16) stays fp32.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(revision=revision)
    if arch == "sd3":
        return load_sd3_models(path, revision, variant, weight_dtype, device, text_encoder_3)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, torch_dtype=weight_dtype, **kw)
    except (OSError, ValueError) as e:
        if _is_sd3(path, revision):
            if arch is not None:
                raise NcpError(f"model.arch={arch!r} but {path!r} holds an sd3 transformer; set model.arch=sd3 or "
                               "leave it empty") from e
            return load_sd3_models(path, revision, variant, weight_dtype, device, text_encoder_3)
        raise NcpError(f"model.pretrained={path!r}: cannot load a diffusers U-Net or SD3 transformer from it ({e})") from e
    found = detect_arch(unet.config)
    if arch is not None and arch != found:
        raise NcpError(f"model.arch={arch!r} but {path!r} holds an {found} U-Net; set model.arch={found} or leave it empty")
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)]
    kw.update(torch_dtype=weight_dtype)
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kw)]
    if found == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision))
        text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", variant=variant, **kw)
        )
    # dtypes are set at load time: diffusers warns about casting a loaded model with `.to(dtype)`
    vae_path, vae_kw = (path, dict(subfolder="vae", variant=variant, revision=revision)) if vae is None else (vae, {})
    vae_config = AutoencoderKL.load_config(vae_path, **{k: v for k, v in vae_kw.items() if k != "variant"})
    vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else weight_dtype
    vae_model = AutoencoderKL.from_pretrained(vae_path, torch_dtype=vae_dtype, **vae_kw)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)

    for m in [unet, vae_model, *text_encoders]:
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    return Models(found, unet, vae_model, tokenizers, text_encoders, scheduler, str(path))


def lora_targets(arch: str, targets) -> list[str]:
    """The modules LoRA goes on: `targets`; for sd3 the default (image-stream) list gains the context stream's
    projections, so both streams of every joint block train."""
    targets = list(targets)
    if arch == "sd3" and targets == list(LORA_TARGETS):
        targets += list(SD3_CONTEXT_TARGETS)
    return targets


def add_lora(unet, rank: int = 64, alpha: float | None = None, init: str | bool = "gaussian",
             targets: tuple[str, ...] | list[str] = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Add a peft LoRA to the denoiser's attention projections; return its (fp32) trainable parameters.
    An SD3 transformer with the default targets gets both streams' projections (`lora_targets`)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    exclude = None
    if type(unet).__name__ == "SD3Transformer2DModel":
        targets = lora_targets("sd3", targets)
        # the last joint block is context_pre_only: its context queries' output is discarded, so a LoRA there
        # could never get a gradient
        exclude = [f"transformer_blocks.{i}.attn.add_q_proj" for i, b in enumerate(unet.transformer_blocks)
                   if b.context_pre_only] or None
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=init, target_modules=list(targets),
                                exclude_modules=exclude))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise NcpError(f"lora.targets={list(targets)} matched no module of the U-Net")
    return params


@contextlib.contextmanager
def adapters_disabled(unet):
    """The reference model: the same U-Net with its LoRA switched off, restored even on error.
    Works through a DistributedDataParallel wrapper (the switch lives on the wrapped module)."""
    base = getattr(unet, "module", unet)
    base.disable_adapters()
    try:
        yield unet
    finally:
        base.enable_adapters()


def lora_state_dict(unet, arch: str = "sd15") -> dict[str, torch.Tensor]:
    """The U-Net's LoRA weights in the diffusers format (`unet.`-less keys, as `save_lora_weights` expects);
    an SD3 transformer's in peft format, as diffusers' SD3 LoRA scripts save them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if arch == "sd3":
        return get_peft_model_state_dict(unet)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def pipeline_class(arch: str):
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}.get(arch, StableDiffusionPipeline)


def save_lora(unet, out_dir: str | Path, arch: str) -> Path:
    """Write `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(out_dir)`."""
    layers = {"transformer_lora_layers" if arch == "sd3" else "unet_lora_layers": lora_state_dict(unet, arch)}
    pipeline_class(arch).save_lora_weights(str(out_dir), **layers, safe_serialization=True)
    return Path(out_dir) / LORA_FILE


def load_lora(unet, lora_dir: str | Path) -> None:
    """Set the U-Net's existing adapter to the weights saved by `save_lora` (used to resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(Path(lora_dir) / LORA_FILE))
    sd = convert_unet_state_dict_to_peft({k.removeprefix("unet.").removeprefix("transformer."): v for k, v in sd.items()})
    result = set_peft_model_state_dict(unet, sd)
    if result.unexpected_keys:
        raise NcpError(f"{lora_dir}: LoRA does not match this U-Net (unexpected keys {result.unexpected_keys[:3]} ...)")
