"""Atomic checkpoints on accelerate's `save_state` / `load_state`.

`checkpoints/checkpoint-<step:08d>/` holds what accelerate saves (optimizer, LR schedule, fp16 GradScaler, every
process's Python / NumPy / torch / CUDA RNG), the LoRA in diffusers format (`pipe.load_lora_weights` loads a
checkpoint folder), each process's t / eps / z generator, and `ncp_state.json` (step, data position, counters,
the run's fingerprint). A checkpoint is written into a hidden temporary folder and renamed into place, so a crash
mid-write never leaves a `checkpoint-*` folder that looks complete. Only the newest `keep` are kept.

A stop signal within an optimizer step writes `checkpoint-<step:08d>-micro<k:03d>/`: the same, plus each process's
LoRA gradients accumulated over the step's first k micro-steps and their metrics (`partial_step_<rank>.safetensors`);
accelerate's saved micro-step count makes the resumed accumulation continue where it stopped.

Several machines: each writes the folders its processes write into. With one `train.output_dir` shared by all
(`shared_folder`), the first process writes the common files once; with a node-local one, each machine's first
process writes its own complete copy (so every machine can resume from its own disk).

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


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(optimizer steps, micro-steps into the next one) of a checkpoint folder's name."""
    step, _, micro = path.name.removeprefix("checkpoint-").partition("-micro")
    return int(step), int(micro or 0)


def shared_folder(accelerator, out: Path) -> bool:
    """Whether every machine sees the same `out`: the first process leaves a file there that the others look for."""
    if accelerator.num_processes == int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)):
        return True  # one machine
    nonce = torch.tensor([int.from_bytes(os.urandom(7), "big") if accelerator.is_main_process else 0])
    nonce = accelerator.reduce(nonce.to(accelerator.device), "sum").item()  # the first process's, everywhere
    probe = out / f".ncp-shared-{nonce}"  # new each launch: a stale probe cannot pass for a shared folder
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    accelerator.wait_for_everyone()
    seen = torch.tensor([float(probe.exists())], device=accelerator.device)
    shared = bool(accelerator.reduce(seen, "sum").item() == accelerator.num_processes)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    return shared


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


def register_state_hooks(accelerator, arch: str, generator: torch.Generator, shared: bool = True) -> None:
    """Make `save_state` / `load_state` write and read the LoRA (not the frozen U-Net) and our noise generator."""
    rank = accelerator.process_index

    def save(models, weights, output_dir):
        if _writes_folder(accelerator, shared):
            save_lora(accelerator.unwrap_model(models[0]), output_dir, arch)
        weights.clear()  # the frozen base weights are not saved: the LoRA above is everything that trains
        save_file({"state": generator.get_state()}, os.path.join(output_dir, f"generator_{rank}.safetensors"))

    def load(models, input_dir):
        load_lora(accelerator.unwrap_model(models[0]), input_dir)
        models.clear()  # loaded above; accelerate would look for full model weights
        generator.set_state(load_file(os.path.join(input_dir, f"generator_{rank}.safetensors"))["state"])

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def _writes_folder(accelerator, shared: bool) -> bool:
    """This process writes the checkpoint's common files: once in a shared folder, once per machine otherwise."""
    return accelerator.is_main_process if shared else accelerator.is_local_main_process


def save_checkpoint(accelerator, output_dir: str | Path, state: dict, keep: int, shared: bool = True,
                    partial: tuple | None = None) -> Path:
    """accelerate state + LoRA + generators + `state` (JSON) as checkpoint-<state["step"]>, atomically. `partial`:
    (LoRA parameters, micro-step metrics) of an unfinished optimizer step, saved by every process."""
    root = Path(output_dir) / "checkpoints"
    name = f"checkpoint-{state['step']:08d}" + (f"-micro{state['micro']:03d}" if state.get("micro") else "")
    final, tmp = root / name, root / f".tmp-{name}"
    writer = _writes_folder(accelerator, shared)
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if partial is not None:
        save_partial_step(tmp, accelerator.process_index, *partial)
    if writer:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if writer:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_partial_step(folder: Path, rank: int, params: list, micro: list[dict]) -> None:
    """This process's accumulated LoRA gradients (fp32, as accumulated; GradScaler-scaled under fp16) and the
    micro-steps' loss and metrics, which the optimizer step will average."""
    tensors = {f"grad.{i}": p.grad.detach().cpu().contiguous() for i, p in enumerate(params) if p.grad is not None}
    tensors.update({f"micro.{k}": torch.stack([m[k] for m in micro]).cpu() for k in micro[0]})
    save_file(tensors, str(folder / f"partial_step_{rank}.safetensors"))


def load_partial_step(folder: Path, rank: int, params: list, device) -> list[dict]:
    """Restore `save_partial_step`'s gradients into `params`; returns the micro-step records."""
    tensors = load_file(str(folder / f"partial_step_{rank}.safetensors"))
    for i, p in enumerate(params):
        grad = tensors.get(f"grad.{i}")
        p.grad = None if grad is None else grad.to(p.device, p.dtype)
    stacked = {k.removeprefix("micro."): v.to(device) for k, v in tensors.items() if k.startswith("micro.")}
    return [{k: v[i] for k, v in stacked.items()} for i in range(len(next(iter(stacked.values()))))]
