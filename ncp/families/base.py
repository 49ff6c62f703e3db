"""`Family`: everything that differs between model families (SD1.5, SDXL, SD3, ...), answered by one object.

The maths (objective, losses, DDPM and flow steps, precision modes) and the machinery (loop, data, cache,
checkpoints, tools) ask a family and never its name. A family is stateless: one instance per module, registered
in `ncp.families.FAMILIES`; `Models.family` carries the one a pipeline folder was loaded as.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NcpError
from ..models import Models, to_latents


def read_config(folder, subfolder: str, revision: str | None = None) -> dict | None:
    """A subfolder's config.json (a local folder, or a hub id in the cache), or None where it has none."""
    from diffusers import ConfigMixin

    class _Any(ConfigMixin):
        config_name = "config.json"

    try:
        return dict(_Any.load_config(str(folder), subfolder=subfolder, revision=revision))
    except (OSError, ValueError):
        return None


class Family:
    """Base class and protocol of a model family. Subclasses set the class attributes and override what differs.

    Attributes: `name` (model.arch, config.yaml, metrics, the fingerprint), `pipeline_name` (diffusers pipeline
    class: validation, generation, LoRA save and load), `denoiser_key` (the pipeline's denoiser component, and the
    LoRA file's key prefix `<key>_lora_layers`), `denoiser_kind` (for texts), `hub_tag` (model card tag),
    `id_hints` (substrings of a hub id naming the family, for a card whose config has no model.arch), `configs`
    (globs of its configs/ files, for tests), `setting_keys` (config keys only this family reads, `configure`).
    """

    name: str = ""
    pipeline_name: str = ""
    denoiser_key: str = "unet"
    denoiser_kind: str = "U-Net"
    hub_tag: str = ""
    id_hints: tuple[str, ...] = ()
    configs: tuple[str, ...] = ()
    denoiser_class: str = ""  # the denoiser's diffusers class, as its config.json names it
    setting_keys: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()  # named variants `tiny` can build (flux: dev, schnell)
    quantizes: bool = False  # model.quantize: `load` takes a bitsandbytes config for the denoiser (and T5)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- what the pipeline folder is -------------------------------------------------------------------------
    def claims(self, config: dict) -> bool:
        """Whether a denoiser's config (its config.json, or a loaded denoiser's) is this family's: by its class
        by default; a family that shares its denoiser class with another refines this."""
        return config.get("_class_name") == self.denoiser_class

    def detect(self, folder, revision: str | None = None) -> bool:
        """Whether the pipeline folder (or hub id) holds this family, read from its denoiser's config."""
        config = read_config(folder, self.denoiser_key, revision)
        return config is not None and self.claims(config)

    def owns(self, denoiser: torch.nn.Module) -> bool:
        """Whether a denoiser module (no folder at hand: `add_lora`) is this family's."""
        return self.claims(dict(denoiser.config, _class_name=type(denoiser).__name__))

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    # -- loading -----------------------------------------------------------------------------------------------
    def load(self, path: str, vae: str | None = None, revision: str | None = None, variant: str | None = None,
             weight_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             text_encoder_3: bool = True, quantize: str = "none") -> Models:
        """The frozen parts (`requires_grad_(False)`, eval, on `device`) in `weight_dtype`; `vae` overrides the
        pipeline's VAE; a VAE whose config asks for `force_upcast` stays fp32. text_encoder_3=False drops the
        family's optional large text encoder (SD3's T5) where it has one."""
        raise NotImplementedError

    # -- conditioning and latents ------------------------------------------------------------------------------
    def encode_prompts(self, models: Models, prompts: list[str]):
        """`Cond` for the prompts, equal to the pipeline's `encode_prompt` (without classifier-free guidance)."""
        raise NotImplementedError

    def cached_cond(self, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None):
        """`Cond` from the latent cache's two text tensors (`Cond.pooled` is what the cache stores)."""
        from ..conditioning import Cond

        return Cond(prompt_embeds, pooled)

    def image_conditioning(self, cond, original_size, crop_top_left, target_size):
        """Per-image conditioning added to a [winners; losers] `Cond` (SDXL's time ids); none by default."""
        return cond

    def latent_channels(self, denoiser: torch.nn.Module) -> int:
        """Channels of the (N, C, h, w) latents the process runs on (a family that packs them says so)."""
        return denoiser.config.in_channels

    def to_latents(self, vae, mean: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean -> the latents the denoiser was trained on (scale and shift from the VAE's config).
        A family whose denoiser takes packed tokens packs them inside `denoise`, never here."""
        return to_latents(vae, mean)

    def check_quantize(self, quantize: str) -> None:
        """model.quantize is for the large transformers; a U-Net (0.9B / 2.6B parameters) fits a 24 GB card in
        bf16, and diffusers' bitsandbytes quantizer replaces only its linear layers, not its convolutions."""
        if quantize != "none" and not self.quantizes:
            from . import FAMILIES

            names = ", ".join(f.name for f in FAMILIES.values() if f.quantizes)
            raise NcpError(f"model.quantize={quantize} applies to the transformer families ({names}); "
                           f"{self.name}'s {self.denoiser_kind} loads unquantized: use model.quantize=none")

    def configure(self, models: Models, cfg) -> None:
        """Apply the run's settings of this family's `setting_keys` to the loaded parts (flux: model.guidance). A key
        only other families read must stay at its default: it would be silently ignored here."""
        from . import FAMILIES

        for family in FAMILIES.values():
            for key in set(family.setting_keys) - set(self.setting_keys):
                section, name = key.split(".")
                value, default = getattr(getattr(cfg, section), name), getattr(type(getattr(cfg, section))(), name)
                if value != default:
                    raise NcpError(f"{key}={value!r} applies to {family.name} models only; this is {self.name}")

    def apply_model_settings(self, denoiser: torch.nn.Module, model_cfg) -> None:
        """Attach the model section's `setting_keys` to a loaded denoiser (flux: guidance and T5 length), where no
        whole run is configured (a pipeline loaded to sample, a benchmark's models); none for this family."""

    def model_settings(self, model_cfg) -> dict:
        """This family's model-section settings in `model_cfg`, {name: value} (flux: guidance, T5 length)."""
        return {key.split(".")[1]: getattr(model_cfg, key.split(".")[1]) for key in self.setting_keys
                if key.startswith("model.")}

    # -- the noise process and the denoiser --------------------------------------------------------------------
    def noise_process(self, scheduler, objective_cfg, resolution: int | None = None):
        """The process the objective runs (`ncp.diffusion.Schedule` or `ncp.flow.FlowSchedule`: one interface), from
        the model's training scheduler; `resolution` (pixels) for a process whose shift depends on the image size."""
        raise NotImplementedError

    @staticmethod
    def denoise(denoiser, x_t: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """The denoiser's prediction (the process's `target`: eps or v) for latents x_t (N, C, h, w) at the
        process's `model_timestep(t)`. A U-Net and an MMDiT take the same keyword call."""
        return denoiser(x_t, timestep=timestep, **cond.unet_kwargs()).sample

    def encoder(self, denoiser: torch.nn.Module, encoder_cfg):
        """f: the frozen perceptual encoder on the base denoiser (built before LoRA), from cfg.encoder."""
        raise NotImplementedError

    # -- LoRA --------------------------------------------------------------------------------------------------
    def lora_targets(self, denoiser: torch.nn.Module, targets) -> tuple[list[str], list[str] | None]:
        """(target_modules, exclude_modules) of the peft LoRA for lora.targets."""
        return list(targets), None

    @property
    def lora_key(self) -> str:
        """The keyword of `pipeline_class.save_lora_weights` (and the saved keys' prefix)."""
        return f"{self.denoiser_key}_lora_layers"

    def lora_state_dict(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The denoiser's LoRA weights as `save_lora_weights` expects them (diffusers format)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))

    # -- sampling with the pipeline ----------------------------------------------------------------------------
    def sampling_scheduler(self, scheduler_config):
        """The scheduler validation images are sampled with."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(scheduler_config)

    def sampling_kwargs(self, denoiser) -> dict:
        """Keyword arguments of the pipeline's call that sample as the denoiser was trained (the conditioning's
        settings that the pipeline's own defaults would change)."""
        return {}

    def pipeline_extras(self, model_cfg) -> dict:
        """Pipeline components beyond denoiser, VAE, text encoders, tokenizers and scheduler (also given to
        `from_pretrained`, where they override the folder's)."""
        return {}

    # -- tests and benchmarks ----------------------------------------------------------------------------------
    def tiny(self, out_dir: Path, seed: int = 0) -> Path:
        """Write a complete tiny pipeline folder of this family (random weights, offline); return its path."""
        raise NotImplementedError

    def example_cond(self, denoiser: torch.nn.Module, n: int, size: int):
        """Random conditioning of the shapes the denoiser takes for n images of size x size pixels (benchmarks:
        only the shapes matter)."""
        raise NotImplementedError

    def config_files(self, root: Path) -> list[Path]:
        """This family's config files under root/configs."""
        return sorted({p for pattern in self.configs for p in (Path(root) / "configs").glob(pattern)})

