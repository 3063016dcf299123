"""DoRA's arithmetic (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as pure functions.

DoRA splits the adapted weight into a learned magnitude ``m`` (one value per output feature) and a direction:
``W' = m * (W + s B A) / ||W + s B A||_row`` (eq. 5). Following sec. 4.3 the norm is treated as a constant
(no gradient flows through it), so with ``g = m / ||W + s B A||`` the layer computes

    y = g * (W x + s B A x) + bias          # (..., out); g broadcasts over the last dim

and ``m`` starts at ``||W + s B A||`` (a fresh adapter is a no-op, whatever the factor init).

The row norm never forms ``W + s B A``: expanding the square,
``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T``, which needs ``W A^T``
``(out, r)`` and ``A A^T`` ``(r, r)`` only; ``||W_i||^2`` depends on the frozen base alone and is cached. PEFT
instead builds ``B A`` through an ``(in, in)`` identity and adds it to a dense copy of ``W``.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def base_row_sq(weight: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """``||W_i||^2`` per output feature, in fp32 (``weight`` is ``(out, in)``, or ``(in, out)`` when flagged)."""
    w = weight.float()
    return (w * w).sum(dim=0 if fan_in_fan_out else 1)  # (out,)


@torch.no_grad()
def row_norm(
    weight: Tensor, a: Tensor, b: Tensor, scaling: float, fan_in_fan_out: bool = False, w_sq: Tensor | None = None
) -> Tensor:
    """``||W + s B A||`` per output feature (fp32, detached), without materializing ``W + s B A``.

    Args:
        weight: Base weight ``(out, in)`` (``(in, out)`` with ``fan_in_fan_out``).
        a: ``A`` ``(r, in)``.
        b: ``B`` ``(out, r)``.
        scaling: The adapter's scale ``s``.
        fan_in_fan_out: Weight layout flag (GPT-2's ``Conv1D``).
        w_sq: Cached `base_row_sq` of ``weight`` (computed when None).
    """
    a32, b32 = a.float(), b.float()
    wa = (a32 @ weight.to(a32.dtype)).T if fan_in_fan_out else weight.to(a32.dtype) @ a32.T  # (out, r)
    w_sq = base_row_sq(weight, fan_in_fan_out) if w_sq is None else w_sq
    cross = (b32 * wa).sum(dim=1)  # (out,): B_i . (W A^T)_i
    gram = a32 @ a32.T  # (r, r)
    ba_sq = ((b32 @ gram) * b32).sum(dim=1)  # (out,): ||(B A)_i||^2
    return (w_sq + 2.0 * scaling * cross + scaling * scaling * ba_sq).clamp_min(0).sqrt()


def combine(result: Tensor, lora: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:
    """``g * (result - bias + lora) + bias``: the DoRA output from the base output ``result = W x + bias``.

    ``g`` is ``(out,)`` or per row ``(batch, out)`` (then ``result`` is ``(batch, ..., out)``). Without autograd
    the work happens in place on ``result`` (a fresh tensor the layer owns).
    """
    g = g.to(result.dtype)
    if g.dim() == 2 and result.dim() > 2:
        g = g.view(g.shape[0], *([1] * (result.dim() - 2)), g.shape[1])  # (batch, 1..., out)
    if torch.is_grad_enabled():
        z = result + lora if bias is None else result - bias + lora
        return z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
    if bias is not None:
        result.sub_(bias)
    result.add_(lora).mul_(g)
    return result if bias is None else result.add_(bias)
