"""Atomic checkpoints on accelerate's `save_state` / `load_state`.

`checkpoints/checkpoint-<step:08d>/` holds what accelerate saves (optimizer, LR schedule, fp16 GradScaler, every
process's Python / NumPy / torch / CUDA RNG), the LoRA in diffusers format (`pipe.load_lora_weights` loads a
checkpoint folder), each process's t / eps / z generator, and `ncp_state.json` (step, data position, counters,
the run's fingerprint). A checkpoint is written into a hidden temporary folder and renamed into place, so a crash
mid-write never leaves a `checkpoint-*` folder that looks complete. Only the newest `keep` are kept.

Nothing is unpickled: accelerate loads its files with `weights_only=True`; the LoRA and generators are
safetensors, our state is JSON. (The generators are saved by our own hook rather than
`register_for_checkpointing`, because accelerate 1.15 loads registered objects with `weights_only=False`.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import NcpError
from .models import load_lora, save_lora

STATE_FILE = "ncp_state.json"  # written last: its presence marks a complete checkpoint
OLD_STATE_FILE = "training_state.pt"  # the pickled state of checkpoints before accelerate's save_state


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists()) if root.exists() else []


def find_checkpoint(output_dir: str, resume_from: str | None) -> Path | None:
    """The checkpoint `train.resume_from` names: None (start fresh), "latest" or a folder."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        if not found and list(Path(output_dir).glob(f"checkpoints/checkpoint-*/{OLD_STATE_FILE}")):
            raise NcpError(f"{output_dir}: its checkpoints were written by an earlier ncp ({OLD_STATE_FILE}) and "
                           "cannot be resumed; start over with train.overwrite=true")
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        old = f" (an earlier ncp's checkpoint, {OLD_STATE_FILE}, cannot be resumed)" if (path / OLD_STATE_FILE).exists() else ""
        raise NcpError(f"train.resume_from={resume_from!r}: no {STATE_FILE} there, not a complete checkpoint{old}")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def register_state_hooks(accelerator, arch: str, generator: torch.Generator) -> None:
    """Make `save_state` / `load_state` write and read the LoRA (not the frozen U-Net) and our noise generator."""
    rank = accelerator.process_index

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(models[0]), output_dir, arch)
        weights.clear()  # the frozen base weights are not saved: the LoRA above is everything that trains
        save_file({"state": generator.get_state()}, os.path.join(output_dir, f"generator_{rank}.safetensors"))

    def load(models, input_dir):
        load_lora(accelerator.unwrap_model(models[0]), input_dir)
        models.clear()  # loaded above; accelerate would look for full model weights
        generator.set_state(load_file(os.path.join(input_dir, f"generator_{rank}.safetensors"))["state"])

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, keep: int) -> Path:
    """accelerate state + LoRA + generators + `state` (JSON) as checkpoint-<state["step"]>, atomically."""
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"checkpoint-{state['step']:08d}", root / f".tmp-checkpoint-{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
