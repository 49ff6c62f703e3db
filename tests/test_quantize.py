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


def test_quantized_load_needs_cuda(tmp_path, run_script):
    """diffusers' bitsandbytes quantizer refuses without a GPU: one line before anything loads, also through the
    real script (before the run folder is made)."""
    from ncp.models import load_models
    from ncp.tiny import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path / "flux", "flux")
    line = "model.quantize=nf4 needs a CUDA device: bitsandbytes quantization in diffusers"
    with pytest.raises(NcpError, match=line):
        load_models(str(path), quantize="nf4", device="cpu")
    with pytest.raises(NcpError, match=line):
        run_script("dpo", ["--config", "configs/tiny_flux_ncp_dpo.yaml", f"model.pretrained={path}",
                           "model.quantize=nf4", f"train.output_dir={tmp_path / 'run'}", "train.report_to=none"])
    assert not (tmp_path / "run").exists()


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


@pytest.fixture(scope="module")
def tiny_flux_models(tmp_path_factory):
    from ncp.models import load_models
    from ncp.tiny import build_tiny_pipeline

    return load_models(str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "flux", "flux")))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_flux_qlora_step_on_cpu(tiny_flux_models, kind):
    """The tiny FLUX transformer with its linears quantized as from_pretrained would (quantize_linears): f's jvp
    equals the float transformer's holding the dequantized weights, and one NCP-DPO step with the linearized error
    gives every LoRA parameter a finite gradient and none to the quantized base (QLoRA)."""
    import copy

    import bitsandbytes as bnb

    from ncp.config import EncoderConfig
    from ncp.models import add_lora
    from ncp.objective import ObjectiveConfig, compute_objective, randomness_for
    from ncp.quantize import dequantized_weight, quantize_linears

    models = tiny_flux_models
    family, base = models.family, models.denoiser
    quantized = quantize_linears(copy.deepcopy(base), kind, torch.float32)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert len(layers) > 10
    dequantized = copy.deepcopy(base)
    for name, layer in layers.items():
        dequantized.get_submodule(name).weight.data.copy_(dequantized_weight(layer))
    torch.manual_seed(0)
    cond = family.example_cond(base, 2, 64)
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([500.0, 200.0])
    tangents = [torch.randn_like(x) for _ in range(2)]
    f = family.encoder(quantized, EncoderConfig(error="linearized"))
    got = f.jvp(x, t, cond, tangents)
    want = family.encoder(dequantized, EncoderConfig(error="linearized")).jvp(x, t, cond, tangents)
    for g, w in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    params = add_lora(quantized, rank=4)
    with torch.no_grad():  # B starts at zero: move the policy off the reference
        for p in params:
            p.add_(1e-2 * torch.randn_like(p))
    cfg = ObjectiveConfig(loss="dpo", space="perceptual", beta=2500.0)
    process = family.noise_process(models.scheduler, cfg)
    x0 = torch.randn(2, 16, 8, 8)
    rnd = randomness_for(cfg, process, 1, x0.shape[1:], torch.Generator().manual_seed(1))
    loss, _ = compute_objective(quantized, f, process, x0, cond, rnd, cfg)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(p.grad.abs().sum() for p in params) > 0
    assert all(not p.requires_grad for n, p in quantized.named_parameters() if "lora" not in n)


def test_gpu_check_cost_flux_dry_run(tmp_path):
    """The GPU check's cost-flux stage on CPU (tiny FLUX): bf16 and nf4 rows, and the CPU refusal of a quantized
    load in its report (on the GPU the same stage loads the tiny FLUX in nf4 through diffusers and transformers)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks/gpu_check.py"), "--dry-run", "--stages", "cost-flux",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    report = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["cost-flux"]
    assert proc.returncode == 0 and report["ok"], (tmp_path / "gpu_check.md").read_text()[-3000:]
    assert [len(report["rows"][q]) for q in ("none", "nf4")] == [3, 3]
    assert "needs a CUDA device" in report["summary"]


def test_flux_memory_counts():
    """benchmarks/flux_memory.py: FLUX.1's 11.9B transformer parameters at 2 bytes in bf16; nf4 and int8 store the
    linears in 0.5625 and ~1 byte (the rest stays bf16); LoRA rank 64 on FLUX's targets."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import flux_memory

    parts = flux_memory.models()
    t = parts["transformer"]
    n = sum(p.numel() for p in t.parameters())
    assert 11.8e9 < n < 12.0e9
    linear = sum(m.weight.numel() for name, m in t.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "proj_out")
    assert flux_memory.weight_bytes(t, "bf16") == 2 * n
    assert flux_memory.weight_bytes(t, "nf4") == pytest.approx(2 * (n - linear) + 0.5625 * linear)
    assert 2 * (n - linear) + linear < flux_memory.weight_bytes(t, "int8") < 2 * (n - linear) + 1.01 * linear
    lora = flux_memory.lora_params(t, 64)
    assert lora == sum(64 * (m.in_features + m.out_features) for name, m in t.named_modules()
                       if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                         "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")))
    assert "counted, not measured" in flux_memory.table()
