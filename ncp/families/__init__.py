"""Model families: one module each (`sd15`, `sdxl`, `sd3`), one `Family` object each (the module's `FAMILY`), found
by name or by folder.

    family = families.detect("stabilityai/stable-diffusion-3.5-medium")   # or families.get("sd3")
    models = family.load(path, weight_dtype=torch.bfloat16)               # Models(family=family, ...)

The `Family` protocol is in `base.py`; ARCHITECTURE.md "Model families" describes it and what a new family adds.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import NcpError
from .base import Family, read_config


def _discover() -> dict[str, Family]:
    """Every module of this package but `base` defines `FAMILY`, its one instance: adding a family adds a module."""
    modules = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")
    return {f.name: f for f in (importlib.import_module(f"{__name__}.{m}").FAMILY for m in modules)}


FAMILIES: dict[str, Family] = _discover()
DEFAULT = "sd15"  # a model card's family when neither model.arch nor the hub id names one

__all__ = ["DEFAULT", "FAMILIES", "Family", "detect", "from_model_id", "get", "names", "of_denoiser", "read_config"]


def names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def get(name: str) -> Family:
    """The family called `name` (model.arch)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise NcpError(f"model.arch must be one of {', '.join(FAMILIES)}, got {name!r}") from None


def detect(folder, revision: str | None = None) -> Family:
    """The family of a pipeline folder or hub id, from its subfolder configs; exactly one must claim it."""
    found = [f for f in FAMILIES.values() if f.detect(folder, revision)]
    if len(found) != 1:
        what = "no known model family" if not found else f"several families ({', '.join(f.name for f in found)})"
        raise NcpError(f"model.pretrained={str(folder)!r}: {what} recognises this pipeline folder (known: "
                       f"{', '.join(FAMILIES)}; each is detected from its unet/ or transformer/ config.json, which a hub id must have in "
                       "the local cache or be able to download)")
    return found[0]


def of_denoiser(denoiser) -> Family | None:
    """The family a denoiser module belongs to (no folder at hand: `ncp.models.add_lora`), or None."""
    base = getattr(denoiser, "module", denoiser)  # DistributedDataParallel
    base = getattr(base, "_orig_mod", base)  # torch.compile
    return next((f for f in FAMILIES.values() if f.owns(base)), None)


def from_model_id(model_id: str) -> Family:
    """The family a hub id's name suggests (a model card whose config has no model.arch); DEFAULT otherwise."""
    lowered = str(model_id).lower()
    return next((f for f in FAMILIES.values() if any(h in lowered for h in f.id_hints)), FAMILIES[DEFAULT])
