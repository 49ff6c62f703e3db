"""Atomic checkpoints: LoRA (diffusers format), optimizer, LR schedule, step, and every process's RNG states.

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash mid-write never
leaves a `checkpoint-*` folder that looks complete. Only the newest `keep` are kept.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import NcpError
from .models import load_lora, save_lora

STATE_FILE = "training_state.pt"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("checkpoint-*") if (p / STATE_FILE).exists()) if root.exists() else []


def resolve_resume(output_dir: str, resume_from: str | None) -> Path | None:
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None  # nothing yet: start fresh (lets a relaunch script always pass latest)
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise NcpError(f"train.resume_from={resume_from!r}: no {STATE_FILE} there, not a complete checkpoint")
    return path


def _rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(accelerator, output_dir, step: int, unet, arch: str, optimizer, lr_scheduler,
                    generator: torch.Generator, state: dict, keep: int) -> Path:
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"checkpoint-{step:08d}", root / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(generator), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_lora(accelerator.unwrap_model(unet), tmp, arch)
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "step": step,
                    "num_processes": accelerator.num_processes, **state}, tmp / STATE_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, unet, optimizer, lr_scheduler, generator: torch.Generator) -> dict:
    """Restore everything save_checkpoint wrote; return the training state dict (step, counters)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state["num_processes"] != accelerator.num_processes:
        raise NcpError(f"{path}: written by {state['num_processes']} processes, resumed with "
                       f"{accelerator.num_processes}; the data order and RNG streams would differ")
    load_lora(accelerator.unwrap_model(unet), path)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    rng = torch.load(path / f"rng_state_{accelerator.process_index}.pt", map_location="cpu", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
