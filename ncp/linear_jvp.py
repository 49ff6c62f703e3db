"""Forward-mode rules for f's frozen linear layers that share their weights with the primal.

f's jvp (encoder.error=linearized) runs every convolution and linear layer of f forward with a tangent.
PyTorch's own forward-AD formulas (2.13) copy the frozen weight on each call (conv2d clones its weight and bias,
linear materialises its transposed weight): about one copy of f's weights per jvp. On the SD1.5 architecture these
rules take 21% of the time out of f's linearized part at 128 px and 36% at 512 px (benchmarks/RESULTS.md section
6). A frozen layer is linear in its input, so its tangent is the same layer on the tangent without the bias:

    d conv2d(x, W, b) = conv2d(dx, W),    d linear(x, W, b) = linear(dx, W)

`frozen_layers()` installs these rules as `F.conv2d` and `F.linear` for the duration of a `with` (torch.nn's
Conv2d and Linear look them up at call time): f's jvp runs inside it, nothing else does. A layer whose weight or
bias needs a gradient, or a string padding, goes to the original. The tangent is recorded for autograd (reverse
over forward: the gradient through it reaches the tangent), and several tangents against one primal batch under
vmap.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_linear, _conv2d = F.linear, F.conv2d  # the originals


class _Linear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b):
        return _linear(x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # no zero tangents (or gradients) of the frozen weight and bias
        ctx.save_for_forward(inputs[1])
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g):
        return None if g is None else g @ ctx.saved_tensors[0], None, None

    @staticmethod
    def jvp(ctx, dx, _dw, _db):
        return None if dx is None else _linear(dx, ctx.saved_tensors[0])


class _Conv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, b, stride, padding, dilation, groups):
        return _conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, *ctx.args = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(w)
        ctx.save_for_backward(w)
        ctx.x_shape = x.shape

    @staticmethod
    def backward(ctx, g):
        gx = None if g is None else torch.nn.grad.conv2d_input(ctx.x_shape, ctx.saved_tensors[0], g, *ctx.args)
        return gx, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        return None if dx is None else _conv2d(dx, ctx.saved_tensors[0], None, *ctx.args)


def _frozen(w, b) -> bool:
    return not (w.requires_grad or (b is not None and b.requires_grad))


def linear(x, w, b=None):
    """`F.linear`; on a frozen layer, with the forward-mode rule above."""
    return _Linear.apply(x, w, b) if _frozen(w, b) else _linear(x, w, b)


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """`F.conv2d`; on a frozen layer with numeric padding, with the forward-mode rule above."""
    if _frozen(w, b) and not isinstance(padding, str):
        return _Conv2d.apply(x, w, b, stride, padding, dilation, groups)
    return _conv2d(x, w, b, stride, padding, dilation, groups)


@contextlib.contextmanager
def frozen_layers():
    """`F.linear` and `F.conv2d` are `linear` and `conv2d` inside the `with`, the originals again after."""
    F.linear, F.conv2d = linear, conv2d
    try:
        yield
    finally:
        F.linear, F.conv2d = _linear, _conv2d
