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
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import blockwise_sdpa
from .errors import NcpError
from .linear_jvp import frozen_layers
from .quantize import dequantized_linears
from .models import adapters_disabled

FEATURES = ("last", "mid", "multiscale")
ERRORS = ("difference", "linearized", "fp32")
# how `linearize` runs f's jvp; the first unless a benchmark says otherwise (math last: the others are tested against it)
LINEARIZE = ("vjp", "vmap", "blockwise", "math")


@contextlib.contextmanager
def _tf32_off():
    """TF32 rounds matmul/conv inputs to a 10-bit mantissa, as coarse as fp16: off for the fp32 encoder."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _f_precision(error: str, dtype: torch.dtype):
    """The switches f's call runs under. The fp32 and difference errors need f in real fp32 (its two features
    are subtracted), so TF32 is off for them, matmul and cuDNN, and the U-Net's own TF32 setting comes back
    after the call (cuDNN convolutions default to TF32 on CUDA). f's backward runs under the caller's setting."""
    if error == "fp32" or (error == "difference" and dtype == torch.float32):
        return _tf32_off()
    return contextlib.nullcontext()


def linearize(fn, x: torch.Tensor, tangents: list[torch.Tensor], path: str = "vjp", base=None) -> list[torch.Tensor]:
    """[J_fn(x) t for t in tangents] by torch.func.jvp, differentiable in the tangents. path (LINEARIZE):
      vjp        vmap's values, computed without keeping anything for the backward; the gradient of J t, J^T g, is
                 the ordinary backward of fn at x, which the backward recomputes (`_Linearized`): f's memory is
                 one call's, as the difference's policy call, and only while its backward runs;
      vmap       one primal fn(x) for all tangents (vmap over the tangent only), attention by `ncp.attention`'s
                 blockwise rule (no whole score matrix with its tangent), frozen convolutions and linear layers by
                 `ncp.linear_jvp`'s (no copy of their weights);
      blockwise  one jvp per tangent (the primal again each time), the same rules;
      math       one jvp per tangent through SDPA's math kernel and PyTorch's own rules for every layer (every score
                 matrix and its tangent at once, the weights copied; kept to measure against).
    The fused SDPA kernels have no forward-AD formula (PyTorch 2.13), hence the math kernel or the custom rule.
    bitsandbytes layers (model.quantize) have none either: they run as their dequantized weight's linear map.
    base: the denoiser whose shared modules fn runs (None: f holds a copy), its LoRA off for every call of fn here
    and in the recomputation (`as_base`), switched outside any functorch transform (the switch sets requires_grad,
    which a transform forbids)."""
    x = x.detach().contiguous()
    tangents = [tan.to(x.dtype).contiguous() for tan in tangents]
    with as_base(base):
        if path == "vjp":
            return list(_Linearized.apply(fn, base, x, *tangents))
        return _jvp(fn, x, tangents, path)


def _jvp(fn, x: torch.Tensor, tangents: list[torch.Tensor], path: str) -> list[torch.Tensor]:
    """`linearize`'s forward-mode paths (not vjp), on a prepared x and tangents."""
    jvp = lambda tan: torch.func.jvp(fn, (x,), (tan,))[1]  # noqa: E731
    if path == "math":
        with sdpa_kernel([SDPBackend.MATH]), dequantized_linears():
            return [jvp(tan) for tan in tangents]
    with blockwise_sdpa(), frozen_layers(), dequantized_linears():
        if path == "blockwise" or len(tangents) == 1:
            return [jvp(tan) for tan in tangents]
        return list(torch.func.vmap(jvp)(torch.stack(tangents)).unbind(0))


class _Linearized(torch.autograd.Function):
    """J t for each tangent t (vmap's jvp, nothing kept); backward: J^T g = the backward of fn at x, recomputed
    under the autocast of the forward and with `base`'s LoRA off, for each tangent that needs a gradient; with the
    base's gradient checkpointing, if it trains with it (f's blocks hold their inputs, not their activations)."""

    @staticmethod
    def forward(ctx, fn, base, x, *tangents):
        ctx.fn, ctx.base, ctx.autocast = fn, base, _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return tuple(_jvp(fn, x, list(tangents), "vmap"))

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        want = [i for i, needs in enumerate(ctx.needs_input_grad[3:]) if needs]
        out = [None] * len(grads)
        if want:
            amp = torch.autocast(x.device.type, **ctx.autocast) if ctx.autocast else contextlib.nullcontext()
            with torch.enable_grad(), amp, as_base(ctx.base, checkpointing=True):
                x_ = x.detach().requires_grad_()
                y = ctx.fn(x_)
                for n, i in enumerate(want):  # backward, not autograd.grad: module hooks (FlopCounterMode's) refuse
                    x_.grad = None            # a leaf inside a nested autograd.grad
                    torch.autograd.backward(y, grads[i], retain_graph=n + 1 < len(want), inputs=[x_])
                    out[i] = x_.grad
        return None, None, None, *out


def _autocast_state(device: str) -> dict | None:
    """The autocast a call on `device` runs under, to run its recomputation the same way (None: the device has none)."""
    if not torch.amp.is_autocast_available(device):
        return None
    return dict(enabled=torch.is_autocast_enabled(device), dtype=torch.get_autocast_dtype(device))


@contextlib.contextmanager
def as_base(base, checkpointing: bool = False):
    """A denoiser's shared modules as the frozen base: its LoRA off, and no gradient checkpointing in them (a
    checkpointed block recomputes during backward, when the LoRA is on again). None (f holds a copy): nothing.
    checkpointing=True leaves the base's checkpointing as it is, for a call whose backward runs inside this context
    (`_Linearized.backward`'s recomputation): its blocks recompute with the LoRA still off. That needs a non-reentrant
    checkpoint function (diffusers' default; a reentrant one refuses the backward's `inputs`)."""
    if base is None:
        yield
        return
    blocks = [] if checkpointing else [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in blocks:
        m.gradient_checkpointing = False
    try:
        with adapters_disabled(base) if getattr(base, "_hf_peft_config_loaded", False) else contextlib.nullcontext():
            yield
    finally:
        for m in blocks:
            m.gradient_checkpointing = True


def hold(encoder: nn.Module, base: nn.Module, modules: dict, share: bool) -> None:
    """f's modules (name -> module of the frozen base): the base's own, unregistered, so f adds no parameters and
    no memory (`encoder._base` = base: its LoRA is switched off around f's calls); or, with share=False or an fp32 f
    (`error="fp32"`) of a half-precision base, a copy of its own, registered so .float() and .to() reach it."""
    encoder._base = None
    if not share or (encoder.fp32 and base.dtype != torch.float32):
        for name, module in modules.items():
            setattr(encoder, name, copy.deepcopy(module))
        if encoder.fp32:
            encoder.float()
    else:
        object.__setattr__(encoder, "_base", base)
        for name, module in modules.items():
            object.__setattr__(encoder, name, module)
    encoder.requires_grad_(False)
    encoder.eval()


class FeatureEncoder(nn.Module):
    """What every f shares: `error` (ERRORS) and a refusal to be cast alone when it runs the denoiser's own
    weights (casting f would do nothing then). Subclasses set `denoiser` (the word in that error) and `dtype`."""

    denoiser = "denoiser"

    def to(self, *args, **kwargs):
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if self._base is not None and dtype is not None and dtype != self.dtype:
            raise NcpError(f"this encoder runs the {self.denoiser}'s own weights: cast the {self.denoiser}, or build "
                           "the encoder with share=False to cast a copy of its own")
        return super().to(*args, **kwargs)

    @property
    def fp32(self) -> bool:
        return self.error == "fp32"

    def _block(self, block: nn.Module, *args):
        """A transformer's block, checkpointed where the base's own loop would checkpoint it: gradient checkpointing
        on and left on by `as_base` (only in the linearized error's recomputation)."""
        if torch.is_grad_enabled() and getattr(self._base, "gradient_checkpointing", False):
            return self._base._gradient_checkpointing_func(block, *args)
        return block(*args)


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:])


class PerceptualEncoder(FeatureEncoder):
    """features: "last" = output of the last down block (the authors' SDXL setting);
    "mid" = after the mid block; "multiscale" = every down-path state and the mid block output,
    average-pooled to the smallest resolution, each scaled so every state weighs the same in the
    mean squared error whatever its channel count (the authors' SD1.5 setting). pool: spatial mean.

    batch_calls: difference / fp32 run f on the true, the policy's and the reference's points in one call of 3x the
    batch (`ncp.objective.perceptual_errors`) rather than three calls.

    share: run the U-Net's own modules (LoRA off) rather than a copy; False, or error=fp32 in a half-precision
    run, keeps a copy that `.to(dtype)` can cast on its own.

    error: how the objective computes the perceptual error (ERRORS; ncp.objective, docs/precision.md):
      difference  f(x_pol) - f(x_true) in the run's precision (the authors' way);
      linearized  J_f(x_true) (x_pol - x_true) by forward-mode AD (`jvp`), the step formed in fp32;
      fp32        difference with this copy kept in fp32 and run outside autocast, with TF32 off.
    x_{t-1} of policy and truth differ by 1e-4..1e-3 of their size, so half-precision rounding of
    f(x_pol) and f(x_true) separately can exceed their difference (benchmarks/precision.py)."""

    denoiser = "U-Net"

    def __init__(self, unet, features: str = "last", pool: bool = False, error: str = "difference", share: bool = True,
                 batch_calls: bool = False):
        super().__init__()
        if features not in FEATURES:
            raise NcpError(f"encoder.features must be one of {FEATURES}, got {features!r}")
        if error not in ERRORS:
            raise NcpError(f"encoder.error must be one of {ERRORS}, got {error!r}")
        if any("lora" in name for name, _ in unet.named_parameters()):
            raise NcpError("build the perceptual encoder from the base U-Net before adding LoRA")
        self.features, self.pool = features, pool
        self.config = unet.config
        self.error, self.batch_calls = error, batch_calls
        self.linearize = LINEARIZE[0]  # how jvp runs (a benchmark's switch, not a setting)
        keep = ["time_proj", "time_embedding", "time_embed_act", "conv_in", "down_blocks"]
        if unet.config.addition_embed_type == "text_time":
            keep += ["add_time_proj", "add_embedding"]
        if features != "last":
            keep.append("mid_block")
        self._keep = keep
        hold(self, unet, {name: getattr(unet, name) for name in keep}, share)

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

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """x: (N, C, h, w) latents at timestep t (N,); cond: ncp.conditioning.Cond with N rows."""
        with as_base(self._base):
            return self._run(x, t, cond)

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if not self.fp32:
            with _f_precision(self.error, self.dtype):
                return self._forward(x, t, cond)
        with torch.autocast(x.device.type, enabled=False), _f_precision(self.error, self.dtype):
            return self._forward(x, t, cond.to(dtype=torch.float32))

    def compile(self, *args, **kwargs) -> None:
        """torch.compile the feature computation; the switches around it (LoRA off) stay eager."""
        self._forward = torch.compile(self._forward, *args, **kwargs)

    def jvp(self, x: torch.Tensor, t: torch.Tensor, cond, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """[J_f(x) tangent for each tangent], by forward-mode AD (`linearize`), in this copy's precision;
        differentiable in the tangents (by f's own backward at x). The primal x gets no gradient. GroupNorm inputs
        are made contiguous: group_norm's forward-AD formula fails on a strided primal (a VAE mean, which is a
        channel slice of the posterior's parameters, or a channels-last activation)."""
        norms = [m for name in self._keep if getattr(self, name) is not None
                 for m in getattr(self, name).modules() if isinstance(m, nn.GroupNorm)]
        hooks = [m.register_forward_pre_hook(_contiguous_input) for m in norms]
        try:
            return linearize(lambda x_: self._run(x_, t, cond), x, tangents, self.linearize, self._base)
        finally:
            for h in hooks:
                h.remove()

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
