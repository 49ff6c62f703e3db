"""The fast path (train.compile, train.channels_last, train.attention): the same numbers as the plain path,
few compilations, exact resume, and what the no-grad passes keep in memory."""

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ncp.conditioning import build_cond
from ncp.diffusion import Schedule
from ncp.encoder import PerceptualEncoder
from ncp.fast import apply_fast_path
from ncp.models import add_lora, load_models
from ncp.objective import ObjectiveConfig, compute_objective, sample_randomness

ROOT = Path(__file__).resolve().parents[1]

# (loss, space, encoder.error). Image counts are equal in every case (DPO and CPO: 1 pair = 2 images;
# SFT: 2 pairs, of which it trains on the 2 winners), so one set of compiled graphs serves them all.
CASES = [("dpo", "perceptual", "difference"), ("cpo", "perceptual", "difference"), ("sft", "perceptual", "difference"),
         ("dpo", "latent", "difference"), ("cpo", "latent", "difference"), ("sft", "latent", "difference"),
         ("dpo", "perceptual", "linearized")]


@pytest.fixture(scope="module")
def plain_and_fast(tiny_sd15):
    """{case: ((loss, LoRA grads) plain, (loss, LoRA grads) with compile + channels-last)}, on one tiny U-Net."""
    torch.manual_seed(0)
    models = load_models(str(tiny_sd15))
    encoders = {e: PerceptualEncoder(models.unet, error=e) for e in ("difference", "linearized")}
    params = add_lora(models.unet, rank=4)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # away from B = 0: policy and reference differ
    models.unet.train()
    schedule = Schedule.from_scheduler(models.scheduler)
    x0 = torch.randn(4, 4, 16, 16)
    cond = build_cond(models, ["a red circle on a white background", "a blue square"], target_size=(32, 32))

    def run(loss, space, error):
        pairs = 2 if loss == "sft" else 1
        rnd = sample_randomness(pairs, (4, 16, 16), 1000, torch.Generator().manual_seed(3))
        xs, cs = (x0, cond) if pairs == 2 else (x0[[0, 2]], cond.index([0, 2]))
        for p in params:
            p.grad = None
        cfg = ObjectiveConfig(loss=loss, space=space, beta=2500.0)
        value, _ = compute_objective(models.unet, encoders[error], schedule, xs, cs, rnd, cfg)
        value.backward()
        return value.item(), [p.grad.clone() for p in params]

    plain = {case: run(*case) for case in CASES}
    for encoder in encoders.values():
        parts = SimpleNamespace(models=models, encoder=encoder)
        apply_fast_path(parts, SimpleNamespace(channels_last=True, compile=encoder.error == "difference",
                                               compile_mode="default"))
    fast = {case: run(*case) for case in CASES}
    return {case: (plain[case], fast[case]) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_fast_path_gives_the_plain_losses_and_gradients(plain_and_fast, case):
    """Float tolerance, not bitwise: fused kernels and channels-last convolutions round differently, and DPO's
    beta x (difference of errors) magnifies that (1e-4 relative at most here). The inductor bug that
    apply_fast_path works around put the LoRA gradient 50-60% off."""
    (loss, grads), (fast_loss, fast_grads) = plain_and_fast[case]
    assert math.isclose(loss, fast_loss, rel_tol=1e-3)
    plain, fast = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in fast_grads])
    assert plain.norm() > 0
    assert (fast - plain).norm() <= 2e-3 * plain.norm()


class Counted:
    """Calls fn and records, per call, the bytes autograd saved for backward during that call."""

    def __init__(self, fn, **attrs):
        self.fn, self.calls = fn, []
        self.__dict__.update(attrs)

    def __call__(self, *args, **kwargs):
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.fn(*args, **kwargs)
        self.calls.append(saved[0])
        return out


@pytest.mark.parametrize("error", ["difference", "linearized"])
def test_reference_and_no_grad_encoder_calls_keep_no_activations(tiny_sd15, error):
    """Only the policy's U-Net pass and f on the policy's x_{t-1} keep activations for backward (the linearized
    error: only f's input point)."""
    models = load_models(str(tiny_sd15))
    encoder = PerceptualEncoder(models.unet, error=error)
    add_lora(models.unet, rank=4)
    models.unet.train()
    unet = Counted(models.unet, module=models.unet)  # `module`: where adapters_disabled finds the LoRA switch
    f = Counted(encoder, error=error, jvp=Counted(encoder.jvp))
    x0 = torch.randn(2, 4, 16, 16)
    cond = build_cond(models, ["a red circle"], target_size=(32, 32))
    rnd = sample_randomness(1, (4, 16, 16), 1000, torch.Generator().manual_seed(0))
    loss, _ = compute_objective(unet, f, Schedule.from_scheduler(models.scheduler), x0, cond, rnd,
                                ObjectiveConfig(loss="dpo", space="perceptual"))
    policy, reference = unet.calls
    assert policy > 0 and reference == 0
    if error == "difference":  # f(x_true), f(x_policy), f(x_reference)
        assert f.calls[0] == 0 and f.calls[1] > 0 and f.calls[2] == 0
    else:  # one jvp: J_f(x_true) [delta_policy, delta_reference] (one primal for both tangents), which keeps only
        # x_true: its gradient is f's own backward, recomputed from there (ncp.encoder.linearize's vjp path)
        assert len(f.jvp.calls) == 1 and f.jvp.calls[0] == x0.numel() * x0.element_size()
    loss.backward()


def test_fast_path_run_compiles_once_and_resumes_exactly(tiny_sd15, tmp_path, monkeypatch):
    """The three scripts' loop with compile + channels-last + gradient checkpointing: every graph is compiled at
    step 1 (at most 2 of them recompilations: dynamo counts the no-grad reference pass and f's no-grad calls as
    new versions of frames it compiled with grad), none after; a run stopped at step 2 and resumed gives the
    straight run's losses and LoRA."""
    import importlib

    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from ncp.metrics import read_metrics

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))

    def run(out, *extra):  # 1 pair of 16x16 latents: the shapes plain_and_fast compiled (inductor's cache serves them)
        AcceleratorState._reset_state(reset_partial_state=True)
        argv = ["--config", str(root / "configs/tiny_sd15_ncp_dpo.yaml"), f"model.pretrained={tiny_sd15}",
                f"train.output_dir={out}", "train.batch_size=1", "data.toy_num_pairs=16", "lora.rank=4",
                "train.validation_prompts=[]", "train.report_to=none", "objective.beta=50000", "train.compile=true",
                "train.channels_last=true", "train.gradient_checkpointing=true", *extra]
        return importlib.import_module("train_ncp_dpo").main(argv)

    run(tmp_path / "straight", "train.max_steps=5")
    rows = read_metrics(tmp_path / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["compiles"] >= 2 and rows[0]["recompiles"] <= 2 and rows[0]["compile_s"] > 0
    assert all((r["compiles"], r["recompiles"]) == (rows[0]["compiles"], rows[0]["recompiles"]) for r in rows)
    run(tmp_path / "resumed", "train.max_steps=2")
    run(tmp_path / "resumed", "train.max_steps=5", "train.resume_from=latest")
    resumed = read_metrics(tmp_path / "resumed")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows] and len({r["loss"] for r in rows}) > 1
    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_attention_backend_is_pinned_logged_and_checked(caplog):
    import logging

    import torch.nn.functional as F

    from ncp.errors import NcpError
    from ncp.fast import attention_backend

    q = torch.randn(1, 2, 8, 4)
    with caplog.at_level(logging.INFO, logger="ncp"):
        with attention_backend("auto", torch.device("cpu"), torch.float32):
            auto = F.scaled_dot_product_attention(q, q, q)
        with attention_backend("math", torch.device("cpu"), torch.float32):
            math_out = F.scaled_dot_product_attention(q, q, q)
    assert "uses flash (train.attention=auto" in caplog.text and "uses math" in caplog.text
    assert torch.allclose(auto, math_out, atol=1e-6)
    # a pinned fused kernel runs every call it can take; one it cannot (here 3-d inputs, on CUDA fp32 ones) falls back
    with attention_backend("flash", torch.device("cpu"), torch.float32), torch.profiler.profile() as prof:
        pinned = F.scaled_dot_product_attention(q, q, q)
        fallback = F.scaled_dot_product_attention(q[0], q[0], q[0])
    kernels = {e.name for e in prof.events() if "_scaled_dot_product" in e.name}
    assert kernels == {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"}
    assert torch.allclose(pinned, math_out, atol=1e-6) and torch.allclose(fallback, math_out[0], atol=1e-6)
    with attention_backend("math", torch.device("cpu"), torch.float32), torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, q, q)
    assert {e.name for e in prof.events() if "_scaled_dot_product" in e.name} == {"aten::_scaled_dot_product_attention_math"}
    with pytest.raises(NcpError, match="train.attention=cudnn is a CUDA kernel"):
        with attention_backend("cudnn", torch.device("cpu"), torch.float32):
            pass


FAULTS = """
import resource, sys
from ncp.hostmem import keep_host_memory
applied = keep_host_memory()  # before torch loads, as the training scripts call it
import torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 3, padding=1))
x = torch.randn(4, 64, 64, 64)
step = lambda: net(x).square().mean().backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_training_keeps_freed_memory_instead_of_faulting_it_in_every_step():
    """Each fresh process repeats a forward and backward: with keep_host_memory the freed activations are reused,
    without it (NCP_KEEP_HOST_MEMORY=0) glibc hands them back and the kernel maps and zeroes them again (minor page
    faults)."""
    faults = {}
    for keep in ("1", "0"):
        env = dict(os.environ, NCP_KEEP_HOST_MEMORY=keep)  # 1: as on a machine without a GPU
        out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, cwd=ROOT, check=True, env=env)
        applied, faults[keep] = out.stdout.split()
        assert applied == {"1": "True", "0": "False"}[keep]
    assert int(faults["1"]) * 4 < int(faults["0"]), faults


def test_cpu_training_flushes_subnormal_floats(tiny_sd15, tmp_path, run_script):
    """A saturated DPO pair's gradient is subnormal, and the CPU's slow path for subnormals made backward 3x slower:
    a CPU run flushes them to zero (a subnormal times 2 reads 0 in its process afterwards)."""
    import torch

    subnormal = torch.tensor([1e-39])
    assert (subnormal * 2).item() > 0  # IEEE by default
    run_script("dpo", ["--config", "configs/tiny_sd15_ncp_dpo.yaml", f"model.pretrained={tiny_sd15}",
                       f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.report_to=none"])
    assert (subnormal * 2).item() == 0.0


def test_host_memory_is_left_alone_on_a_gpu_machine(monkeypatch):
    from ncp import hostmem

    monkeypatch.setattr(hostmem, "applied", False)
    monkeypatch.setattr(hostmem, "gpu_present", lambda: True)
    monkeypatch.delenv("NCP_KEEP_HOST_MEMORY", raising=False)
    assert hostmem.keep_host_memory() is False
    monkeypatch.setenv("NCP_KEEP_HOST_MEMORY", "0")
    monkeypatch.setattr(hostmem, "gpu_present", lambda: False)
    assert hostmem.keep_host_memory() is False
