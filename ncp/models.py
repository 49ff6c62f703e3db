"""The frozen parts of a model family (`Models`) and the trainable LoRA on its denoiser.

One denoiser serves as policy (LoRA on) and reference (LoRA off, see `adapters_disabled`), so the
reference costs no extra memory. What differs between families (which parts load, the denoiser's kind, LoRA
targets and save format) is asked of `Models.family` (`ncp.families`). Frozen weights are cast to the half
precision of the run; trainable LoRA weights stay fp32 (diffusers `cast_training_params`).
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
    family: object  # the ncp.families.Family the folder was loaded as
    denoiser: torch.nn.Module  # UNet2DConditionModel, SD3Transformer2DModel, ...
    vae: torch.nn.Module
    tokenizers: list  # the pipeline's tokenizer, tokenizer_2, tokenizer_3 (None where dropped)
    text_encoders: list  # the pipeline's text_encoder, text_encoder_2, ... (None where dropped)
    scheduler: object  # the model's own training scheduler (DDPMScheduler, FlowMatchEulerDiscreteScheduler)
    path: str = ""

    @property
    def arch(self) -> str:
        """The family's name (model.arch, config.yaml, the fingerprint, metrics)."""
        return self.family.name

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, by its older name."""
        return self.denoiser

    @unet.setter
    def unet(self, module: torch.nn.Module) -> None:
        self.denoiser = module

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def frozen(self, device) -> "Models":
        """Every loaded part frozen, in eval mode, on `device`."""
        for m in [self.denoiser, self.vae, *self.text_encoders]:
            if m is not None:
                m.requires_grad_(False)
                m.eval()
                if getattr(m, "hf_quantizer", None) is None:  # a quantized model is placed by its loader
                    m.to(device)
        return self


def to_latents(vae, mean: torch.Tensor) -> torch.Tensor:
    """VAE posterior mean -> the latents the denoiser was trained on: mean * scaling_factor, and for a VAE with a
    shift (SD3's) (mean - shift_factor) * scaling_factor (the pipelines decode latents / scale + shift)."""
    shift = vae.config.get("shift_factor")
    if shift is None:
        return mean * vae.config.scaling_factor
    return (mean - shift) * vae.config.scaling_factor


def load_models(
    path: str, arch: str | None = None, vae: str | None = None, revision: str | None = None,
    variant: str | None = None, weight_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    text_encoder_3: bool = True, quantize: str = "none",
) -> Models:
    """The frozen parts of the pipeline folder or hub id at `path`, loaded by its family (detected from the folder;
    `arch`, when given, must match it). `vae` overrides the pipeline's VAE (e.g. `madebyollin/sdxl-vae-fp16-fix`).
    quantize (model.quantize): the transformer and T5 in int8 / nf4, refused before loading where it cannot be."""
    from . import families
    from .quantize import check_device

    family = families.detect(path, revision)
    if arch is not None and arch != family.name:
        raise NcpError(f"model.arch={arch!r} but {path!r} holds an {family.name} {family.denoiser_kind}; "
                       f"set model.arch={family.name} or leave it empty")
    family.check_quantize(quantize)
    check_device(quantize, device)
    return family.load(path, vae, revision, variant, weight_dtype, device, text_encoder_3, quantize)


def add_lora(unet, rank: int = 64, alpha: float | None = None, init: str | bool = "gaussian",
             targets: tuple[str, ...] | list[str] = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Add a peft LoRA to the denoiser's attention projections; return its (fp32) trainable parameters.
    The family may widen the targets (an SD3 transformer: both attention streams, `Family.lora_targets`)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from . import families

    targets, exclude = (families.of_denoiser(unet) or families.Family()).lora_targets(unet, targets)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights=init, target_modules=list(targets),
                                exclude_modules=exclude))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise NcpError(f"lora.targets={list(targets)} matched no module of the denoiser")
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


def pipeline_class(arch: str):
    """The diffusers pipeline class of the family named `arch`."""
    from . import families

    return families.get(arch).pipeline_class


ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "use_dora",
                  "use_rslora", "lora_bias")  # what diffusers' load_lora_weights builds the LoraConfig from


def save_lora(unet, out_dir: str | Path, arch: str) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the family's format, loadable with `pipe.load_lora_weights(out_dir)`.
    The adapter's config goes into the file's metadata: without it diffusers loads lora.alpha as the rank, so a
    LoRA trained at alpha / rank != 1 would be applied at another strength."""
    from . import families

    family = families.get(arch)
    config = getattr(unet, "module", unet).peft_config["default"].to_dict()
    config = {k: config[k] for k in ADAPTER_FIELDS if config.get(k) is not None}  # an older peft takes these too
    family.pipeline_class.save_lora_weights(str(out_dir), **{family.lora_key: family.lora_state_dict(unet),
                                                             f"{family.denoiser_key}_lora_adapter_metadata": config},
                                            safe_serialization=True)
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
