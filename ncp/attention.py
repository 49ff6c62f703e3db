"""Scaled-dot-product attention with a forward-mode rule that never holds a whole score matrix.

f's jvp (encoder.error=linearized) differentiates attention forward. PyTorch's fused SDPA kernels have no
forward-AD formula (2.13), and its math kernel materialises every (queries x keys) score matrix together
with its tangent, and keeps the probabilities for the backward through the tangent: at 64x64 latents that
doubled the step's peak. Here the primal runs the fused kernel, and the tangent

    P = softmax(s Q K^T),  dS = s (dQ K^T + Q dK^T),  dP = P * (dS - rowsum(P * dS)),  dO = dP V + P dV

is computed over blocks of queries, its backward (reverse over forward: the gradient through dO into the
tangents dQ, dK, dV) recomputing each block's P. The primal Q, K, V get no gradient through the tangent
(f's primal is a detached point through frozen weights). `blockwise_sdpa()` installs it as
`F.scaled_dot_product_attention` for the duration of a `with` (diffusers' attention processors look it up
at call time): f's jvp runs inside it, nothing else does.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_sdpa = F.scaled_dot_product_attention  # the kernel-dispatching original
# elements of one block's score matrix (per tangent): 2^24 = 64 MB in fp32, a few of them live at once
BLOCK_ELEMENTS = 2 ** 24


def _rows(q: torch.Tensor, dq, k: torch.Tensor, budget: int) -> int:
    """Queries per block: the block's score matrix (all leading dims, tangents included) within budget."""
    lead = math.prod(torch.broadcast_shapes(q.shape[:-2], *(() if dq is None else (dq.shape[:-2],))))
    return max(1, budget // max(1, lead * k.shape[-2]))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Softmax and its tangent in fp32 (float64 stays), as the math kernel upcasts half precision."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _probs(qs, k, mask):
    """P for queries `qs` already multiplied by the scale (a pass over the queries, not over the scores)."""
    s = _wide(qs @ k.transpose(-2, -1))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    return s.softmax(-1)


def _block_mask(mask, sl):
    """The mask's rows for a block of queries (a mask broadcast over queries has one row)."""
    return None if mask is None else (mask if mask.shape[-2] == 1 else mask[..., sl, :])


def _times(p, x):
    """p @ x where x leads with tangent dims that p lacks: they ride in x's columns, so the score-sized p is
    multiplied once, not expanded (copied) per tangent."""
    extra = x.dim() - p.dim()
    if extra <= 0 or x.shape[extra:-2] != p.shape[:-2]:
        return p @ x
    inner = tuple(range(-extra - 1, -1))  # where the tangent dims sit in [B..., T, E..., d]
    cols = x.movedim(tuple(range(extra)), inner)
    out = p @ cols.reshape(*cols.shape[:-extra - 1], -1)
    return out.reshape(*out.shape[:-1], *x.shape[:extra], x.shape[-1]).movedim(inner, tuple(range(extra)))


def _score_tangent(qs, k, dqs, dk):
    """(left, right) with dS = left[rows] @ right^T = s (dQ K^T + Q dK^T): one product over [s dQ, s Q] and
    [K, dK] where both tangents are given (no sum of two score-sized products); None without Q and K tangents."""
    if dqs is None or dk is None:
        return (None, None) if dqs is None and dk is None else ((dqs, k) if dk is None else (qs, dk))
    left = torch.broadcast_shapes(dqs.shape, qs.shape)
    right = torch.broadcast_shapes(dk.shape[:-2], k.shape[:-2]) + k.shape[-2:]
    return torch.cat([dqs.expand(left), qs.expand(left)], -1), torch.cat([k.expand(right), dk.expand(right)], -1)


class _Tangent(torch.autograd.Function):
    """dO from primal (q, k, v) and tangents (dq, dk, dv; None = zero), blockwise over queries. The tangents may
    carry extra leading dims (several tangents against one primal: broadcasting does the rest). Per block the
    score-sized work is P, one product for dS, dP = P dS - P rowsum(P dS) in place (two passes), and the
    products with V and dV; the scale rides on the query-sized operands."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv, scale, mask, rows):
        qs = q * scale
        left, right = _score_tangent(qs, k, None if dq is None else dq * scale, dk)
        out = []
        for i in range(0, q.shape[-2], rows):
            sl = slice(i, i + rows)
            p = _probs(qs[..., sl, :], k, _block_mask(mask, sl))
            do = 0
            if left is not None:
                dp = _wide(left[..., sl, :] @ right.transpose(-2, -1)).mul_(p)  # P dS: a fresh tensor, in place
                dp.addcmul_(p, dp.sum(-1, keepdim=True), value=-1)
                do = dp.to(v.dtype) @ v
            if dv is not None:
                do = do + _times(p.to(v.dtype), dv)
            out.append(do if torch.is_tensor(do) else torch.zeros_like(q[..., sl, :]))
        return torch.cat(out, -2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, dq, dk, dv, scale, mask, rows = inputs
        ctx.save_for_backward(q, k, v, mask)
        ctx.shapes = [None if t is None else t.shape for t in (dq, dk, dv)]
        ctx.scale, ctx.rows = scale, rows

    @staticmethod
    def backward(ctx, g):
        if any(ctx.needs_input_grad[:3]):
            raise RuntimeError("blockwise SDPA: the tangent's backward reaches the tangents only, not the primal Q, K, V")
        q, k, v, mask = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[3:6]
        qs, vw = q * ctx.scale, _wide(v)
        gq, gk_t, gv = [], None, None
        for i in range(0, q.shape[-2], ctx.rows):
            sl = slice(i, i + ctx.rows)
            p = _probs(qs[..., sl, :], k, _block_mask(mask, sl))
            gb = g[..., sl, :]
            if need_v:
                part = _times(p.to(v.dtype).transpose(-2, -1), gb)
                gv = part if gv is None else gv.add_(part)
            if need_q or need_k:
                # dL/dS / s = P (G V^T - rowsum(P G V^T)), the rowsum as rowsum(G (P V)): query-sized, not a pass
                # over the scores; P V in fp32 (the block's attention output)
                gs = _wide(gb @ v.transpose(-2, -1))
                gs = gs.sub_((_wide(gb) * (p @ vw)).sum(-1, keepdim=True)).mul_(p).to(q.dtype)
                if need_q:
                    gq.append(gs @ k)
                if need_k:  # accumulated as Q^T G, where the score-sized G is the contiguous operand
                    part = q[..., sl, :].transpose(-2, -1) @ gs
                    gk_t = part if gk_t is None else gk_t.add_(part)
        shape_q, shape_k, shape_v = ctx.shapes
        s = ctx.scale
        return (None, None, None, (torch.cat(gq, -2) * s).sum_to_size(shape_q) if need_q else None,
                (gk_t.transpose(-2, -1) * s).sum_to_size(shape_k) if need_k else None,
                gv.sum_to_size(shape_v) if need_v else None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, q, k, v, dq, dk, dv, scale, mask, rows):
        """Several tangents against one primal: the vmapped dim leads, the maths broadcasts over it."""
        def lead(x, d):
            if x is None or d is None:
                return x
            return x.movedim(d, 0)
        if any(d is not None for d in in_dims[:3] + in_dims[7:8]):
            raise NotImplementedError("blockwise SDPA: vmap over the tangents only (one primal)")
        dq, dk, dv = (lead(x, d) for x, d in zip((dq, dk, dv), in_dims[3:6]))
        rows = _rows(q, dq if dq is not None else (dk if dk is not None else dv), k, BLOCK_ELEMENTS)
        return _Tangent.apply(q, k, v, dq, dk, dv, scale, mask, rows), 0


class _SDPA(torch.autograd.Function):
    """softmax(s Q K^T + mask) V by the fused kernel; forward-mode rule: `_Tangent`."""

    @staticmethod
    def forward(q, k, v, mask, scale):
        return _sdpa(q, k, v, attn_mask=mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale = inputs
        ctx.save_for_backward(q, k, v, mask)
        ctx.save_for_forward(q, k, v, mask)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, g):
        q, k, v, mask = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3])]
            out = _sdpa(*inputs, attn_mask=mask, scale=ctx.scale)
            wanted = [x for x in inputs if x.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, g))
        return (*(next(grads) if x.requires_grad else None for x in inputs), None, None)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dmask, _dscale):
        q, k, v, mask = ctx.saved_tensors
        scale = ctx.scale
        return _Tangent.apply(q, k, v, dq, dk, dv, scale, mask, _rows(q, dq, k, BLOCK_ELEMENTS))

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, scale):
        if any(d is not None for d in in_dims):
            raise NotImplementedError("blockwise SDPA: the primal is not vmapped (one primal, several tangents)")
        return _SDPA.apply(q, k, v, mask, scale), None


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` with the blockwise forward-mode rule; what it does not cover (dropout,
    causal, grouped-query attention) goes to the original, whose math kernel has a forward-AD formula."""
    if dropout_p or is_causal or enable_gqa or query.shape[:-2] != key.shape[:-2]:
        with sdpa_kernel([SDPBackend.MATH]):
            return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    return _SDPA.apply(query, key, value, attn_mask, scale)


@contextlib.contextmanager
def blockwise_sdpa():
    """`F.scaled_dot_product_attention` is `sdpa` inside the `with` (for f's jvp), the original again after."""
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _sdpa
