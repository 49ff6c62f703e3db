"""Loading the frozen parts of SD1.5 / SDXL and the trainable LoRA on the U-Net.

One U-Net serves as policy (LoRA on) and reference (LoRA off, see `adapters_disabled`), so the
reference costs no extra memory. Frozen weights are cast to the half precision of the run;
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


@dataclass
class Models:
    arch: str  # "sd15" or "sdxl"
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizers: list
    text_encoders: list
    scheduler: object  # DDPMScheduler built from the model's own scheduler config
    path: str = ""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def detect_arch(unet_config) -> str:
    """SDXL U-Nets take pooled text + micro-conditioning through `addition_embed_type="text_time"`."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def load_models(
    path: str, arch: str | None = None, vae: str | None = None, revision: str | None = None,
    variant: str | None = None, weight_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> Models:
    """Load U-Net, VAE, tokenizer(s), text encoder(s) and a DDPM scheduler from a hub id or local folder.

    `vae` overrides the pipeline's VAE (e.g. `madebyollin/sdxl-vae-fp16-fix`). A VAE whose config asks for
    `force_upcast` (the stock SDXL VAE, which overflows in fp16) stays fp32.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(revision=revision)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, torch_dtype=weight_dtype, **kw)
    except (OSError, ValueError) as e:
        raise NcpError(f"model.pretrained={path!r}: cannot load a diffusers U-Net from it ({e})") from e
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


def add_lora(unet, rank: int = 64, alpha: float | None = None, init: str | bool = "gaussian",
             targets: tuple[str, ...] | list[str] = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Add a peft LoRA to the U-Net's attention projections; return its (fp32) trainable parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=init, target_modules=list(targets)))
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


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The U-Net's LoRA weights in the diffusers format (`unet.`-less keys, as `save_lora_weights` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def save_lora(unet, out_dir: str | Path, arch: str) -> Path:
    """Write `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(out_dir)`."""
    pipeline_class(arch).save_lora_weights(str(out_dir), unet_lora_layers=lora_state_dict(unet), safe_serialization=True)
    return Path(out_dir) / LORA_FILE


def load_lora(unet, lora_dir: str | Path) -> None:
    """Set the U-Net's existing adapter to the weights saved by `save_lora` (used to resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(Path(lora_dir) / LORA_FILE))
    sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
    result = set_peft_model_state_dict(unet, sd)
    if result.unexpected_keys:
        raise NcpError(f"{lora_dir}: LoRA does not match this U-Net (unexpected keys {result.unexpected_keys[:3]} ...)")
