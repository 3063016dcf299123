"""The LoRA branch of a linear layer as one autograd function that saves what backward needs and no more.

``delta = scaling * B (A dropout(x))``. Written with ordinary modules, autograd keeps a dense dropped-out copy
of ``x`` for every adapted layer (to form ``dA``) on top of the dropout mask. Here backward gets ``x`` itself
(usually already kept alive by the layers around it, so no new memory), a 1-byte-per-element mask, and the small
``h = A x_d`` (rank-sized); the dropped-out input is rebuilt in backward. With dropout 0 there is no mask and no
copy at all. The arithmetic is the plain formula's, so gradients match it exactly in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _LoraLinearDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, scaling: float, p: float) -> Tensor:
        mask = None
        xd = x.to(a.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        if p > 0:
            mask = torch.rand(x.shape, device=x.device) >= p  # keep with probability 1 - p (faster than bernoulli_)
            xd = xd * mask  # a temporary, not saved; the 1 / (1 - p) scale goes on the rank-sized h instead
        h = F.linear(xd, a)  # (..., r)
        if p > 0:
            h = h * (1.0 / (1.0 - p))
        out = F.linear(h, b) * scaling  # (..., out)
        ctx.save_for_backward(x, a, b, h, mask)
        ctx.scaling, ctx.p = scaling, p
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, a, b, h, mask = ctx.saved_tensors
        s, p = ctx.scaling, ctx.p
        dtype = grad.dtype  # autocast is off in backward: compute in the incoming gradient's dtype
        g = grad.reshape(-1, grad.shape[-1]) * s  # (n, out); scaled first, in the order autograd would
        h2 = h.reshape(-1, h.shape[-1]).to(dtype)  # (n, r)
        grad_b = (g.T @ h2).to(b.dtype) if ctx.needs_input_grad[2] else None  # (out, r)
        gh = g @ b.to(dtype)  # (n, r)
        if mask is not None:
            gh = gh * (1.0 / (1.0 - p))  # the dropout scale, applied on rank-sized tensors (as in forward)
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            xd = x.reshape(-1, x.shape[-1]).to(dtype)
            if mask is not None:
                xd = xd * mask.reshape(xd.shape)
            grad_a = (gh.T @ xd).to(a.dtype)  # (r, in)
        if ctx.needs_input_grad[0]:
            gx = gh @ a.to(dtype)  # (n, in), a fresh tensor: masked in place
            if mask is not None:
                gx.mul_(mask.reshape(gx.shape))
            grad_x = gx.reshape(x.shape).to(x.dtype)
        return grad_x, grad_a, grad_b, None, None


def lora_linear_delta(x: Tensor, a: Tensor, b: Tensor, scaling: float, p: float = 0.0) -> Tensor:
    """``scaling * (dropout_p(x) @ a.T) @ b.T`` with lean saved state (``p`` only matters in training)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad)):
        xd = F.dropout(x, p) if p > 0 else x  # no autograd: nothing is saved anyway
        if not torch.is_autocast_enabled(x.device.type):
            xd = xd.to(a.dtype)
        return F.linear(F.linear(xd, a), b) * scaling
    return _LoraLinearDelta.apply(x, a, b, scaling, p)
