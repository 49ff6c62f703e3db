"""The forward-mode rules of f's jvp against PyTorch's own: the blockwise attention (ncp.attention) against
torch.func.jvp through SDPA's math kernel, and the frozen convolutions and linear layers (ncp.linear_jvp)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ncp import attention
from ncp.attention import blockwise_sdpa, sdpa

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def inputs(dtype, queries=13, keys=11, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_k = (2, 3, queries, 8), (2, 3, keys, 8)
    q, k, v = (torch.randn(s, generator=g, dtype=dtype) for s in (shape_q, shape_k, shape_k))
    tq, tk, tv = (torch.randn(s, generator=g, dtype=dtype) for s in (shape_q, shape_k, shape_k))
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, queries, keys, generator=g) > 0.3
        m[..., 0] = True  # no row fully masked
    elif mask == "float":
        m = torch.randn(2, 1, 1, keys, generator=g, dtype=dtype)
    return (q, k, v), (tq, tk, tv), m


def math_jvp(primals, tangents, mask):
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), primals, tangents)


@pytest.fixture(params=[3, 10 ** 9], ids=["blocks-of-3-rows", "one-block"])
def rows(request, monkeypatch):
    """Blocks of 3 queries split 13 unevenly (3+3+3+3+1); the budget counts elements of 2 x 3 heads x 11 keys."""
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", request.param * 2 * 3 * 11)
    return request.param


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tangent_equals_the_math_kernels_jvp(rows, dtype, mask):
    primals, tangents, m = inputs(dtype, mask=mask)
    out, tangent = torch.func.jvp(lambda q, k, v: sdpa(q, k, v, attn_mask=m), primals, tangents)
    ref_out, ref_tangent = math_jvp(primals, tangents, m)
    assert torch.allclose(out, ref_out, atol=TOL[dtype], rtol=0)
    assert torch.allclose(tangent, ref_tangent, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_through_the_tangent_equals_the_math_kernels(rows, dtype):
    """Reverse over forward: d/d(tangents) of a loss of the output tangent, as the policy's gradient flows."""
    primals, tangents, _ = inputs(dtype)
    w = torch.randn(2, 3, 13, 8, dtype=dtype, generator=torch.Generator().manual_seed(5))
    grads = []
    for run in (lambda t: torch.func.jvp(sdpa, primals, t)[1], lambda t: math_jvp(primals, t, None)[1]):
        t = tuple(x.clone().requires_grad_() for x in tangents)
        (run(t) * w).square().sum().backward()
        grads.append([x.grad for x in t])
    for ours, ref in zip(*grads):
        assert torch.allclose(ours, ref, atol=TOL[dtype] * 10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_tangents_against_one_primal_under_vmap(rows, dtype):
    """vmap over the tangent only: each row equals its own jvp, and gradients reach each tangent."""
    primals, (tq, tk, tv), _ = inputs(dtype)
    stacked = [torch.stack([x, 2 * x.flip(0)]).requires_grad_() for x in (tq, tk, tv)]
    out = torch.func.vmap(lambda *t: torch.func.jvp(sdpa, primals, t)[1])(*stacked)
    out.square().sum().backward()
    for j in range(2):
        t = tuple(x.detach()[j].clone().requires_grad_() for x in stacked)
        ref = math_jvp(primals, t, None)[1]
        assert torch.allclose(out[j], ref, atol=TOL[dtype], rtol=0)
        ref.square().sum().backward()
        for x, r in zip(stacked, t):
            assert torch.allclose(x.grad[j], r.grad, atol=TOL[dtype] * 10, rtol=0)


def test_cross_attention_without_key_tangents_and_the_switch_restores_the_original():
    """Keys and values from the prompt carry no tangent; outside the `with` F's SDPA is the original again."""
    (q, k, v), (tq, _, _), _ = inputs(torch.float64)
    original = F.scaled_dot_product_attention
    with blockwise_sdpa():
        assert F.scaled_dot_product_attention is sdpa
        ours = torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (tq,))[1]
    assert F.scaled_dot_product_attention is original
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.func.jvp(lambda q: F.scaled_dot_product_attention(q, k, v), (q,), (tq,))[1]
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- frozen convolutions and linear layers (linear_jvp)
def frozen_net(dtype):
    """Frozen convolutions (stride, padding, groups, with and without bias) and linear layers, around nonlinearities."""
    torch.manual_seed(0)
    net = torch.nn.ModuleDict(dict(
        a=torch.nn.Conv2d(4, 8, 3, padding=1), b=torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False),
        c=torch.nn.Linear(8, 6), d=torch.nn.Linear(6, 5, bias=False))).to(dtype).requires_grad_(False)

    def f(x):
        h = net["b"](F.silu(net["a"](x)))
        return net["d"](F.gelu(net["c"](h.flatten(2).transpose(1, 2))))
    return net, f


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frozen_layer_rules_equal_pytorchs_under_vmap_and_through_the_tangent(dtype):
    """Two tangents against one primal under vmap: the tangents, and the gradient through the first one into it,
    equal PyTorch's own forward-mode rules; outside the `with` F.linear and F.conv2d are the originals again."""
    from ncp.linear_jvp import frozen_layers

    _, f = frozen_net(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=dtype)
    tangents = torch.randn(2, 2, 4, 6, 6, generator=g, dtype=dtype)
    originals = F.linear, F.conv2d
    results = []
    for switch in (contextlib.nullcontext, frozen_layers):
        t = tangents.clone().requires_grad_(True)
        with switch():
            out = torch.func.vmap(lambda tan: torch.func.jvp(f, (x,), (tan,))[1])(t)
        (out[0] ** 2).sum().backward()
        results.append((out.detach(), t.grad))
    assert (F.linear, F.conv2d) == originals
    (ref, ref_grad), (ours, our_grad) = results
    assert ref_grad[0].abs().max() > 0 and torch.equal(our_grad[1], torch.zeros_like(our_grad[1]))
    assert torch.allclose(ours, ref, atol=TOL[dtype], rtol=0)
    assert torch.allclose(our_grad, ref_grad, atol=TOL[dtype], rtol=0)


def test_frozen_layer_rules_copy_no_weight():
    """PyTorch's rules copy a frozen layer's weight on every jvp; these do not (nor make zero tangents of it); a
    layer whose weight needs a gradient goes to PyTorch's rule."""
    from torch.profiler import profile

    from ncp.linear_jvp import frozen_layers

    net, f = frozen_net(torch.float32)
    weights = {tuple(p.shape) for p in net.parameters()}
    weights |= {tuple(p.t().shape) for p in net.parameters() if p.dim() == 2}  # linear's copy is transposed
    x, t = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)

    def weight_copies(switch):
        with switch(), profile(record_shapes=True) as p:
            torch.func.jvp(f, (x,), (t,))
        return [e.key for e in p.key_averages(group_by_input_shape=True)
                if e.key in ("aten::clone", "aten::copy_", "aten::zeros_like") and e.input_shapes
                and tuple(e.input_shapes[0]) in weights]

    assert weight_copies(contextlib.nullcontext)  # the test can fail: PyTorch's rules copy
    assert weight_copies(frozen_layers) == []
    net["c"].weight.requires_grad_(True)
    with frozen_layers():
        out = torch.func.jvp(f, (x,), (t,))[1]
    assert torch.allclose(out, torch.func.jvp(f, (x,), (t,))[1], atol=1e-6, rtol=0)
