"""model.quantize: the frozen transformer (and T5) loaded in 8 or 4 bits by bitsandbytes, LoRA on top (QLoRA).

`quantization_config` is what the families pass to `from_pretrained`; `dequantized_linears` makes forward-mode AD
(f's jvp, encoder.error=linearized) see each bitsandbytes layer as the float linear map of its dequantized weight:
bitsandbytes' own autograd functions give no tangent (Linear4bit: a silent zero; Linear8bitLt: an error).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .errors import NcpError

QUANTIZE = ("none", "int8", "nf4")


def quantization_config(quantize: str, dtype: torch.dtype, library: str = "diffusers"):
    """The `BitsAndBytesConfig` of `diffusers` or `transformers` for model.quantize (None for "none"): int8 =
    LLM.int8 (load_in_8bit), nf4 = 4-bit NormalFloat computing in the run's weight dtype (QLoRA's setting)."""
    if quantize == "none":
        return None
    if quantize not in QUANTIZE:
        raise NcpError(f"model.quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    import importlib

    config = importlib.import_module(library).BitsAndBytesConfig
    if quantize == "int8":
        return config(load_in_8bit=True)
    return config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def check_device(quantize: str, device) -> None:
    """diffusers' bitsandbytes quantizer refuses to load without a GPU (diffusers 0.42: `validate_environment`)."""
    if quantize != "none" and torch.device(device).type != "cuda":
        raise NcpError(f"model.quantize={quantize} needs a CUDA device: bitsandbytes quantization in diffusers "
                       f"loads on a GPU only (this run is on {torch.device(device).type}); use model.quantize=none")


def dequantized_weight(layer) -> torch.Tensor:
    """The float weight a bitsandbytes Linear4bit / Linear8bitLt stands for: nf4 codes x block absmax, or the
    int8 rows x their absmax / 127."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    if isinstance(layer, bnb.nn.Linear4bit):
        return BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    scb = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # its first forward moves it
    return BF.int8_vectorwise_dequant(layer.weight.data, scb)


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    dtype = getattr(self, "compute_dtype", None) or x.dtype  # Linear4bit computes in its compute dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    return F.linear(x.to(dtype), dequantized_weight(self).to(dtype), bias).to(x.dtype)


@contextlib.contextmanager
def dequantized_linears():
    """bitsandbytes Linear4bit / Linear8bitLt run as F.linear of their dequantized weight, for f's jvp only.
    nf4 stores weights only (the primal is the same product); int8 also rounds the activations in its forward,
    a step function whose derivative is the float map's. Restored even on error."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # no quantized layer can exist
        yield
        return
    classes = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    saved = [cls.__dict__["forward"] for cls in classes]
    for cls in classes:
        cls.forward = _dequantized_forward
    try:
        yield
    finally:
        for cls, forward in zip(classes, saved):
            cls.forward = forward



def quantize_linears(module: torch.nn.Module, quantize: str, dtype: torch.dtype, skip=("proj_out",)) -> torch.nn.Module:
    """Every nn.Linear of `module` (but the top-level `skip`: diffusers keeps the output projection) replaced in place
    by its bitsandbytes layer, quantized on the weight's device: what `from_pretrained(quantization_config=...)` makes,
    for random-weight models (benchmarks, tests; diffusers' quantizer itself loads on a GPU only)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if name in skip:
            continue
        if not isinstance(child, torch.nn.Linear):
            quantize_linears(child, quantize, dtype, skip=())  # skip names top-level modules only
            continue
        w, device, shape = child.weight.data, child.weight.device, (child.in_features, child.out_features)
        if quantize == "nf4":
            layer = bnb.nn.Linear4bit(*shape, bias=child.bias is not None, compute_dtype=dtype, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize(device)
        else:
            layer = bnb.nn.Linear8bitLt(*shape, bias=child.bias is not None, has_fp16_weights=False, threshold=6.0,
                                        device="meta")
            layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)._quantize(device)
        layer.bias = child.bias
        setattr(module, name, layer.requires_grad_(False))
    return module
