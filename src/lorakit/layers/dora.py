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


# ---- the layer side: what a LoRA linear layer does for its DoRA adapters ------------------------------------
# ``layer`` is a `lorakit.layers.LoraLinear` (dense or 4-bit base); these functions keep its DoRA code in one file.


def dense_weight(layer) -> Tensor:
    """The base weight as stored (dense), or dequantized for a 4-bit base (a fresh tensor)."""
    base = layer.base_layer
    fn = getattr(base, "dequantized_weight", None)
    if callable(fn):
        return fn()
    from lorakit.quant import dequantized_weight, is_quantized

    return dequantized_weight(base) if is_quantized(base) else base.weight


def _weight_key(layer) -> tuple:
    """Identifies the current base weight (tensor identity + in-place version), for the cached ``||W_i||^2``."""
    base = layer.base_layer
    held = [t for t in (*base.parameters(recurse=False), *base.buffers(recurse=False)) if t is not None]
    return tuple((id(t), t._version) for t in held)


def current_norm(layer, name: str) -> Tensor:
    """``||W + s B A||`` per output feature for adapter ``name`` (detached), cached while nothing changed."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    wkey = _weight_key(layer)
    key = (wkey, id(a), a._version, id(b), b._version, layer.scaling[name])
    cache = layer.__dict__.setdefault("_dora_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    weight = dense_weight(layer)
    sq = cache.get("__w_sq__")
    if sq is None or sq[0] != wkey:
        sq = (wkey, base_row_sq(weight, layer.fan_in_fan_out))
        cache["__w_sq__"] = sq
    norm = row_norm(weight, a.detach(), b.detach(), layer.scaling[name], layer.fan_in_fan_out, sq[1])
    cache[name] = (key, norm)
    return norm


def scale(layer, name: str) -> Tensor:
    """``g = m / ||W + s B A||`` ``(out,)``: gradients reach ``m`` only (DoRA sec. 4.3)."""
    m = layer.lora_magnitude_vector[name]
    return m / current_norm(layer, name).to(m.dtype)


@torch.no_grad()
def init_magnitude(layer, name: str) -> None:
    """Create adapter ``name``'s magnitude ``m = ||W + s B A||`` (so the fresh adapter changes nothing)."""
    from torch import nn

    a = layer.lora_A[name].weight
    norm = current_norm(layer, name)
    layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(device=a.device, dtype=a.dtype))


def add(layer, result: Tensor, x: Tensor, name: str) -> Tensor:
    """``result`` (the base output, plus earlier adapters) with DoRA adapter ``name`` applied, as PEFT composes it.

    With dropout active (training, p > 0) PEFT applies the magnitude to the dropped-out input's base term:
    ``result + (g - 1) W dropout(x) + g s B A dropout(x)``; otherwise ``g * (result - bias + s B A x) + bias``.
    """
    from torch import nn

    from lorakit.layers.lora_function import lora_linear_delta

    a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    g = scale(layer, name)  # (out,)
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        xd = dropout(x)
        weight = dense_weight(layer)
        base_term = torch.nn.functional.linear(xd.to(weight.dtype), weight.T if layer.fan_in_fan_out else weight)
        lora = lora_linear_delta(xd, a, b, s)
        return result + ((g - 1).to(result.dtype) * base_term + g.to(result.dtype) * lora).to(result.dtype)
    lora = lora_linear_delta(x, a, b, s).to(result.dtype)  # (..., out)
    return combine(result, lora, g, layer.bias)


def routed_scale(layer, names: list[str], idx: Tensor) -> Tensor | None:
    """Each row's ``g`` ``(batch, out)`` (ones for rows without a DoRA adapter), or None when no row has one."""
    if not any(n in layer.lora_magnitude_vector for n in names):
        return None
    ones = torch.ones(layer.out_features, device=idx.device)
    table = [scale(layer, n).float() if n in layer.lora_magnitude_vector else ones for n in names]
    return torch.stack([*table, ones])[idx]  # (batch, out)


@torch.no_grad()
def merged_weight(layer, name: str, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(g * (W + s B A), g)`` in fp32 in ``weight``'s layout (unmerging restores the kept weight and replays)."""
    w = weight.float()
    a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    norm = row_norm(w, a, b, s, layer.fan_in_fan_out)
    g = layer.lora_magnitude_vector[name].float() / norm  # (out,)
    g_view = g[None, :] if layer.fan_in_fan_out else g[:, None]
    return g_view * (w + layer.delta_weight(name)), g
