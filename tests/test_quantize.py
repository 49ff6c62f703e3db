"""model.quantize: config checks, the CPU refusal, and f's jvp through bitsandbytes layers (CPU, layer level)."""

import pytest
import torch

from ncp.config import Config, load_config
from ncp.errors import NcpError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quantize_is_checked_and_run_defining():
    assert load_config(overrides=["model.quantize=nf4", "model.arch=flux"]).model.quantize == "nf4"
    with pytest.raises(NcpError, match="model.quantize must be one of none, int8, nf4, got 'fp8'"):
        load_config(overrides=["model.quantize=fp8"])
    with pytest.raises(NcpError, match=r"model.quantize=int8 applies to the transformer families \(.*flux.*\); "
                                       r"sd15's U-Net loads unquantized"):
        load_config(overrides=["model.quantize=int8", "model.arch=sd15"])
    cfg = Config()
    assert "model.quantize" in cfg.fingerprint(1)  # a resume may not switch it


def test_fp32_error_is_refused_on_a_quantized_base():
    with pytest.raises(NcpError, match="encoder.error=fp32 keeps an fp32 copy of f.*use encoder.error=linearized"):
        load_config(overrides=["model.quantize=nf4", "encoder.error=fp32"])
    # auto in bf16 is linearized (allowed); with a re-noised target it would be fp32 (refused)
    assert load_config(overrides=["model.quantize=nf4", "train.mixed_precision=bf16"]).encoder.error == "linearized"
    with pytest.raises(NcpError, match="encoder.error=auto chose fp32"):
        load_config(overrides=["model.quantize=nf4", "train.mixed_precision=bf16", "objective.target=uniform"])


def test_quantized_load_needs_cuda(tmp_path):
    """diffusers' bitsandbytes quantizer refuses without a GPU: one line before anything loads."""
    from ncp.models import load_models
    from ncp.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path / "flux", "flux")
    with pytest.raises(NcpError, match="model.quantize=nf4 needs a CUDA device: bitsandbytes quantization in diffusers"):
        load_models(str(path), quantize="nf4", device="cpu")


def test_quantization_config():
    from ncp.quantize import quantization_config

    assert quantization_config("none", torch.bfloat16) is None
    q = quantization_config("nf4", torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("int8", torch.bfloat16, "transformers").load_in_8bit


def _quantized(kind: str, lin: torch.nn.Linear):
    import bitsandbytes as bnb

    if kind == "nf4":
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=torch.float32, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu").requires_grad_(False)  # bitsandbytes 0.50 quantizes on the move to a device


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_jvp_through_bitsandbytes_layers(kind):
    """linearize (f's jvp) through a quantized layer equals the jvp of nn.Linear holding its dequantized weight,
    and the gradient through the tangent (what the loss backpropagates) agrees too. Without the swap, bitsandbytes
    gives a zero tangent (nf4) or fails (int8)."""
    from ncp.encoder import linearize
    from ncp.quantize import dequantized_weight

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    layer = _quantized(kind, lin)
    ref = torch.nn.Linear(64, 48).requires_grad_(False)
    ref.weight.copy_(dequantized_weight(layer).float()), ref.bias.copy_(lin.bias)
    assert (ref.weight - lin.weight).abs().max() > 0  # the quantized weight differs from the float one
    fn = lambda m: (lambda x: torch.tanh(m(x)))  # noqa: E731  (a nonlinearity: the primal matters)
    x = torch.randn(5, 64)
    tangents = [torch.randn(5, 64, requires_grad=True) for _ in range(2)]
    got = linearize(fn(layer), x, tangents)
    want = linearize(fn(ref), x, tangents)
    for g, w in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(sum(g.square().sum() for g in got), tangents)
    ref_grads = torch.autograd.grad(sum(w.square().sum() for w in want), tangents)
    for g, w in zip(grads, ref_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    import bitsandbytes as bnb

    assert bnb.nn.Linear4bit.forward.__name__ == "forward" and bnb.nn.Linear8bitLt.forward.__name__ == "forward"
