"""The perceptual encoder f: the frozen base U-Net's downsampling stack (paper Sec. 3).

f(x_{t'}, t', c) runs the time embedding (+ SDXL's added text/time embedding), `conv_in` and every
down block (cross-attending to the prompt), optionally the mid block, and returns features whose
squared distance replaces the latent-space error. f is the base model as it was before LoRA: it runs
the U-Net's own down-path modules with the LoRA switched off (the paper's frozen copy without a second
copy of the weights: 0.94 GB fp32 saved on SD1.5); only encoder.error=fp32 in a half-precision run
keeps its own fp32 copy. Its weights never get gradients; gradients flow through its activations.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NcpError
from .models import adapters_disabled

FEATURES = ("last", "mid", "multiscale")
ERRORS = ("difference", "linearized", "fp32")


@contextlib.contextmanager
def _tf32_off():
    """TF32 rounds matmul/conv inputs to a 10-bit mantissa, as coarse as fp16: off for the fp32 encoder."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


class PerceptualEncoder(nn.Module):
    """features: "last" = output of the last down block (the authors' SDXL setting);
    "mid" = after the mid block; "multiscale" = every down-path state and the mid block output,
    average-pooled to the smallest resolution, each scaled so every state weighs the same in the
    mean squared error whatever its channel count (the authors' SD1.5 setting). pool: spatial mean.

    share: run the U-Net's own modules (LoRA off) rather than a copy; False, or error=fp32 in a half-precision
    run, keeps a copy that `.to(dtype)` can cast on its own.

    error: how the objective computes the perceptual error (ERRORS; ncp.objective, docs/precision.md):
      difference  f(x_pol) - f(x_true) in the run's precision (the authors' way);
      linearized  J_f(x_true) (x_pol - x_true) by forward-mode AD (`jvp`), the step formed in fp32;
      fp32        difference with this copy kept in fp32 and run outside autocast, with TF32 off.
    x_{t-1} of policy and truth differ by 1e-4..1e-3 of their size, so half-precision rounding of
    f(x_pol) and f(x_true) separately can exceed their difference (benchmarks/precision.py)."""

    def __init__(self, unet, features: str = "last", pool: bool = False, error: str = "difference", share: bool = True):
        super().__init__()
        if features not in FEATURES:
            raise NcpError(f"encoder.features must be one of {FEATURES}, got {features!r}")
        if error not in ERRORS:
            raise NcpError(f"encoder.error must be one of {ERRORS}, got {error!r}")
        if any("lora" in name for name, _ in unet.named_parameters()):
            raise NcpError("build the perceptual encoder from the base U-Net before adding LoRA")
        self.features, self.pool = features, pool
        self.config = unet.config
        self.error = error
        keep = ["time_proj", "time_embedding", "time_embed_act", "conv_in", "down_blocks"]
        if unet.config.addition_embed_type == "text_time":
            keep += ["add_time_proj", "add_embedding"]
        if features != "last":
            keep.append("mid_block")
        self._keep = keep
        self._base = None  # the U-Net whose modules f runs (None: f holds a copy)
        if not share or (self.fp32 and unet.dtype != torch.float32):
            for name in keep:  # its own copy, registered: .float() and .to() reach it
                setattr(self, name, copy.deepcopy(getattr(unet, name)))
            if self.fp32:
                self.float()
        else:  # the base's own modules, unregistered: f adds no parameters and no memory
            object.__setattr__(self, "_base", unet)
            for name in keep:
                object.__setattr__(self, name, getattr(unet, name))
        self.requires_grad_(False)
        self.eval()

    def to(self, *args, **kwargs):
        """A shared f runs the U-Net's own weights: casting f alone would do nothing, so it is refused."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if self._base is not None and dtype is not None and dtype != self.dtype:
            raise NcpError("this encoder runs the U-Net's own weights: cast the U-Net, or build the encoder with "
                           "share=False to cast a copy of its own")
        return super().to(*args, **kwargs)

    @property
    def fp32(self) -> bool:
        return self.error == "fp32"

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def _embedding(self, t: torch.Tensor, cond) -> torch.Tensor:
        # as UNet2DConditionModel.forward (diffusers 0.42): time_proj -> time_embedding (+ text_time) -> act
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.config.addition_embed_type == "text_time":
            time_embeds = self.add_time_proj(cond.time_ids.flatten()).reshape(len(t), -1)
            add = torch.cat([cond.text_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add)
        return emb if self.time_embed_act is None else self.time_embed_act(emb)

    @contextlib.contextmanager
    def _as_base(self):
        """The shared modules as the frozen base: the U-Net's LoRA off, and no gradient checkpointing in them
        (a checkpointed block recomputes during backward, when the LoRA is on again)."""
        base = self._base
        if base is None:
            yield
            return
        blocks = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
        for m in blocks:
            m.gradient_checkpointing = False
        try:
            with adapters_disabled(base) if getattr(base, "_hf_peft_config_loaded", False) else contextlib.nullcontext():
                yield
        finally:
            for m in blocks:
                m.gradient_checkpointing = True

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """x: (N, C, h, w) latents at timestep t (N,); cond: ncp.conditioning.Cond with N rows."""
        with self._as_base():
            return self._run(x, t, cond)

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if not self.fp32:
            return self._forward(x, t, cond)
        with torch.autocast(x.device.type, enabled=False), _tf32_off():
            return self._forward(x, t, cond.to(dtype=torch.float32))

    def compile(self, *args, **kwargs) -> None:
        """torch.compile the feature computation; the switches around it (LoRA off) stay eager."""
        self._forward = torch.compile(self._forward, *args, **kwargs)

    def jvp(self, x: torch.Tensor, t: torch.Tensor, cond, tangent: torch.Tensor) -> torch.Tensor:
        """J_f(x) tangent, by forward-mode AD (torch.func.jvp), in this copy's precision; differentiable
        in `tangent` (reverse over forward). The primal x gets no gradient. SDPA runs its math kernel:
        the fused CPU/GPU attention kernels have no forward-AD formula (PyTorch 2.13). GroupNorm inputs are
        made contiguous: group_norm's forward-AD formula fails on a strided primal (a VAE mean, which is a
        channel slice of the posterior's parameters, or a channels-last activation)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        norms = [m for name in self._keep if getattr(self, name) is not None
                 for m in getattr(self, name).modules() if isinstance(m, nn.GroupNorm)]
        hooks = [m.register_forward_pre_hook(_contiguous_input) for m in norms]
        try:  # the LoRA switch sets requires_grad, which a functorch transform forbids: switch outside it
            with self._as_base(), sdpa_kernel([SDPBackend.MATH]):
                _, out = torch.func.jvp(lambda x_: self._run(x_, t, cond), (x.detach().contiguous(),),
                                        (tangent.to(x.dtype).contiguous(),))
        finally:
            for h in hooks:
                h.remove()
        return out

    def _forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        emb = self._embedding(t, cond)
        ehs = cond.encoder_hidden_states.to(self.dtype)
        h = self.conv_in(x.to(self.dtype))
        states = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, res = block(hidden_states=h, temb=emb)
            states += res
        if self.features != "last":
            if getattr(self.mid_block, "has_cross_attention", False):
                h = self.mid_block(h, emb, encoder_hidden_states=ehs)
            else:
                h = self.mid_block(h, emb)
            states.append(h)
        if self.features == "multiscale":
            size = h.shape[-2:]
            total = sum(s.shape[1] for s in states)
            h = torch.cat([F.adaptive_avg_pool2d(s, size) * (total / (len(states) * s.shape[1])) ** 0.5 for s in states], 1)
        return h.mean(dim=(2, 3)) if self.pool else h
