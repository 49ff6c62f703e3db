"""The fast path (docs/training.md "Fast path"): channels-last memory format, the SDPA attention backend and
torch.compile, each a switch (train.channels_last, train.attention, train.compile). With them on, the
losses and LoRA gradients equal the plain path's within float tolerance (tests/test_fast.py); the
defaults are what `benchmarks/step_cost.py --fast` measured (benchmarks/RESULTS.md, section 5).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch._inductor.config

from .errors import NcpError

log = logging.getLogger("ncp")

ATTENTION = ("auto", "flash", "efficient", "cudnn", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def apply_fast_path(parts, tc) -> None:
    """Channels-last weights for the U-Net, the VAE and f, and torch.compile of the U-Net and f, in place
    (`nn.Module.compile`: parameter names stay as they are, so LoRA files and checkpoints do not change)."""
    if tc.channels_last:
        for module in (parts.models.unet, parts.models.vae, parts.encoder):  # f: its fp32 copy, if it has one
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if not tc.compile:
        return
    torch._dynamo.reset()  # as in a fresh process: the run's compile figures (compile_stats) are its own
    configure_inductor()
    torch._dynamo.utils.clear_compilation_metrics()
    # One graph per state, compiled once: LoRA on with grad, LoRA off without (the reference), and f with and
    # without grad. Toggling the adapters switches graphs through dynamo's guards, it does not recompile.
    parts.models.unet.compile(mode=tc.compile_mode)
    if parts.encoder is None:
        return
    if parts.encoder.error == "linearized":
        # dynamo cannot trace torch.func.jvp through group_norm's forward-mode AD (PyTorch 2.13: a fake-tensor
        # assert), and a compiled f called from an eager jvp falls back to eager anyway: f's jvp stays eager
        log.info("train.compile: f's forward-mode derivative (encoder.error=linearized) runs eagerly")
    else:
        parts.encoder.compile(mode=tc.compile_mode)


def configure_inductor() -> None:
    """Inductor's peak-memory reordering (PyTorch 2.13) returns zero input gradients from a frozen UpBlock2D
    (conv, nearest upsample, conv): a U-Net's LoRA gradients came out 60% off. tests/test_fast.py catches it."""
    torch._inductor.config.reorder_for_peak_memory = False


def compile_stats() -> dict:
    """What torch.compile has done in this process: graphs compiled, how many were recompilations (a guard
    failed on a frame compiled before), and the seconds spent compiling (forward and backward graphs)."""
    from torch._dynamo.utils import get_compilation_metrics

    metrics = [m for m in get_compilation_metrics() if m.has_guarded_code]
    seconds = sum((m.entire_frame_compile_time_s or 0.0) + (m.backward_cumulative_compile_time_us or 0) / 1e6
                  for m in metrics)
    return {"compiles": len(metrics), "recompiles": sum(bool(m.recompile_reason) for m in metrics),
            "compile_s": round(seconds, 2)}


def recompile_reasons() -> list[str]:
    from torch._dynamo.utils import get_compilation_metrics

    return [m.recompile_reason for m in get_compilation_metrics() if m.recompile_reason]


@contextlib.contextmanager
def attention_backend(name: str, device: torch.device, dtype: torch.dtype):
    """Put one scaled_dot_product_attention backend first ("auto": PyTorch picks per call; "math": math only) and
    log, once, which one the run's attention uses. A call the chosen fused kernel cannot take falls back to
    PyTorch's order (flash, efficient, math): on CUDA flash and cuDNN take only fp16 / bf16, and some attention
    runs in fp32 whatever the run's precision (SDXL's upcast VAE; f under encoder.error=fp32). f's forward-mode
    derivative always runs the math backend (the fused kernels have no forward-AD formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name in ("efficient", "cudnn") and device.type != "cuda":
        raise NcpError(f"train.attention={name} is a CUDA kernel; on {device.type} use auto, flash or math")
    chosen = sdpa_choice(device, dtype) if name == "auto" else name
    log.info("attention: scaled_dot_product_attention on %s %s uses %s%s", device.type,
             str(dtype).removeprefix("torch."), chosen, " (train.attention=auto: PyTorch's choice)" if name == "auto" else "")
    if name == "auto":
        yield
        return
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    fallbacks = [] if name == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel([backend] + [b for b in fallbacks if b != backend], set_priority=True):
        yield


def sdpa_choice(device: torch.device, dtype: torch.dtype, heads: int = 8, tokens: int = 256, head_dim: int = 64) -> str:
    """The backend PyTorch's dispatcher picks for an SD-sized attention call (self-attention, no mask)."""
    q = torch.zeros(2, heads, tokens, head_dim, device=device, dtype=dtype)
    try:
        index = torch._fused_sdp_choice(q, q, q)
    except (AttributeError, RuntimeError):  # a private dispatcher entry: say so rather than fail a run
        return "unknown"
    from torch.nn.attention import SDPBackend

    names = {SDPBackend.MATH: "math", SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "efficient",
             SDPBackend.CUDNN_ATTENTION: "cudnn"}
    return next((v for k, v in names.items() if int(k) == index), f"backend {index}")
