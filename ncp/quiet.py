"""Known harmless messages of the libraries, silenced one by one by their own text (never a whole logger or a
whole warning category), so that every ncp command's output holds what matters."""

from __future__ import annotations

import logging
import re

NO_LORA_KEYS = r"No LoRA keys associated to \w+ found with the prefix"  # ncp LoRAs hold denoiser keys only
KNOWN_NOISE = {  # logger -> message pattern, each with why it is harmless
    # the optional `kernels` package speeds up 4-bit CPU inference, which ncp never runs
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # without torchvision the PIL image processors are used; they compute the same inputs
    "transformers.utils.import_utils": r"requires torchvision \(not installed\); falling back to",
    "diffusers.loaders.lora_base": NO_LORA_KEYS,
    "diffusers.loaders.peft": NO_LORA_KEYS,
    "diffusers.loaders.lora_pipeline": NO_LORA_KEYS,
}


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message matches `pattern`; lets every other record through."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_known_noise() -> None:
    """Install the KNOWN_NOISE filters (idempotent; cheap: no library is imported)."""
    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))
