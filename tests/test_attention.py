"""The blockwise forward-mode attention rule (ncp.attention) against torch.func.jvp through SDPA's math kernel."""

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
