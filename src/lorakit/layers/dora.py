"""DoRA's arithmetic (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as pure functions.

DoRA splits the adapted weight into a learned magnitude ``m`` (one value per output feature) and a direction:
``W' = m * (W + s B A) / ||W + s B A||_row`` (eq. 5). Following sec. 4.3 the norm is treated as a constant
(no gradient flows through it), so with ``g = m / ||W + s B A||`` the layer computes

    y = g * (W x + s B A x) + bias          # (..., out); g broadcasts over the feature dim

and ``m`` starts at ``||W + s B A||`` (a fresh adapter is a no-op, whatever the factor init).

One output feature's "row" is what PEFT normalizes for each layer kind: a row of a linear weight ``(out, in)``
(a column of GPT-2's ``(in, out)``), a column of an embedding table ``(num_embeddings, dim)`` (one norm per
embedding dimension, over all tokens), and a whole filter ``(in, *kernel)`` of a convolution. Conv factors are
flattened to matrices (``A: (r, in * prod(kernel))``, ``B: (out, r)``), so the same expansion serves all three.

The row norm never forms ``W + s B A``: expanding the square,
``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T``, which needs ``W A^T``
``(out, r)`` and ``A A^T`` ``(r, r)`` only; ``||W_i||^2`` depends on the frozen base alone and is cached. PEFT
instead builds ``B A`` through an ``(in, in)`` identity and adds it to a dense copy of ``W``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def base_row_sq(weight: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """``||W_i||^2`` per output feature, in fp32 (``weight`` is ``(out, ...)``, or ``(in, out)`` when flagged)."""
    w = weight.float()
    return (w * w).sum(dim=0) if fan_in_fan_out else (w * w).flatten(1).sum(dim=1)  # (out,)


@torch.no_grad()
def row_norm(
    weight: Tensor, a: Tensor, b: Tensor, scaling: float, fan_in_fan_out: bool = False, w_sq: Tensor | None = None
) -> Tensor:
    """``||W + s B A||`` per output feature (fp32, detached), without materializing ``W + s B A``.

    Args:
        weight: Base weight ``(out, in)`` (``(in, out)`` with ``fan_in_fan_out``; ``(out, in, *kernel)`` for a conv).
        a: ``A`` ``(r, in)`` (a conv's ``(r, in, *kernel)``).
        b: ``B`` ``(out, r)`` (a conv's ``(out, r, 1, ...)``).
        scaling: The adapter's scale ``s``.
        fan_in_fan_out: Weight layout flag (GPT-2's ``Conv1D``, an embedding table).
        w_sq: Cached `base_row_sq` of ``weight`` (computed when None).
    """
    a32, b32 = a.float().flatten(1), b.float().flatten(1)  # (r, in), (out, r)
    w = weight.to(a32.dtype)
    wa = (a32 @ w).T if fan_in_fan_out else w.flatten(1) @ a32.T  # (out, r)
    w_sq = base_row_sq(weight, fan_in_fan_out) if w_sq is None else w_sq
    cross = (b32 * wa).sum(dim=1)  # (out,): B_i . (W A^T)_i
    gram = a32 @ a32.T  # (r, r)
    ba_sq = ((b32 @ gram) * b32).sum(dim=1)  # (out,): ||(B A)_i||^2
    return (w_sq + 2.0 * scaling * cross + scaling * scaling * ba_sq).clamp_min(0).sqrt()


def combine(result: Tensor, lora: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:
    """``g * (result - bias + lora) + bias``: the DoRA output from the base output ``result = W x + bias``.

    ``g`` and ``bias`` come shaped to broadcast against ``result`` (see `LoraLayer.feature_view`). Without
    autograd the work happens in place on ``result`` (a fresh tensor the layer owns).
    """
    g = g.to(result.dtype)
    if torch.is_grad_enabled():
        z = result + lora if bias is None else result - bias + lora
        return z * g if bias is None else torch.addcmul(bias.to(z.dtype), z, g)
    if bias is not None:
        result.sub_(bias)
    result.add_(lora).mul_(g)
    return result if bias is None else result.add_(bias)


# ---- the layer side: what a LoRA layer does for its DoRA adapters --------------------------------------------
# ``layer`` is a `lorakit.layers.LoraLayer` (linear, 4-bit linear, embedding or conv); its ``factors(name)`` gives
# ``(A, B)`` as stored and ``weight_in_out`` its base weight's layout; these functions keep DoRA in one file.


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
    """``||W + s B A||`` per output feature ``(out,)`` for adapter ``name`` (detached), cached while unchanged."""
    a, b = layer.factors(name)
    wkey = _weight_key(layer)
    key = (wkey, id(a), a._version, id(b), b._version, layer.scaling[name])
    cache = layer.__dict__.setdefault("_dora_cache", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    weight = dense_weight(layer)
    sq = cache.get("__w_sq__")
    if sq is None or sq[0] != wkey:
        sq = (wkey, base_row_sq(weight, layer.weight_in_out))
        cache["__w_sq__"] = sq
    norm = row_norm(weight, a.detach(), b.detach(), layer.scaling[name], layer.weight_in_out, sq[1])
    cache[name] = (key, norm)
    return norm


def scale(layer, name: str) -> Tensor:
    """``g = m / ||W + s B A||`` ``(out,)``: gradients reach ``m`` only (DoRA sec. 4.3)."""
    m = layer.lora_magnitude_vector[name].reshape(-1)  # (out,): a conv's PEFT shape (1, out, 1, ...) flattened
    return m / current_norm(layer, name).to(m.dtype)


@torch.no_grad()
def init_magnitude(layer, name: str) -> None:
    """Create adapter ``name``'s magnitude ``m = ||W + s B A||`` (so the fresh adapter changes nothing).

    ``m`` has PEFT's shape for the layer kind (``layer.magnitude_shape()``), so saved files load both ways.
    """
    a = layer.factors(name)[0]
    norm = current_norm(layer, name).reshape(layer.magnitude_shape())
    layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(device=a.device, dtype=a.dtype))


def add(layer, result: Tensor, x: Tensor, name: str) -> Tensor:
    """``result`` (the base output, plus earlier adapters) with DoRA adapter ``name`` applied, as PEFT composes it.

    With dropout active (training, p > 0) PEFT applies the magnitude to the dropped-out input's base term:
    ``result + (g - 1) W dropout(x) + g s B A dropout(x)``; otherwise ``g * (result - bias + s B A x) + bias``.
    ``layer.base_term(x)`` is ``W x`` without bias and ``layer.lora_forward(x, name, dropout=False)`` the branch
    on an already dropped-out input. Embedding layers have no dropout on their branch (token ids).
    """
    g = layer.feature_view(scale(layer, name), result)  # (out,) shaped to broadcast over result
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0 and layer.dropout_on_input:
        xd = dropout(x)
        base_term = layer.base_term(xd)
        lora = layer.lora_forward(xd, name, dropout=False)
        return result + ((g - 1).to(result.dtype) * base_term + g.to(result.dtype) * lora).to(result.dtype)
    lora = layer.lora_forward(x, name).to(result.dtype)
    bias = layer.bias
    return combine(result, lora, g, None if bias is None else layer.feature_view(bias, result))


def routed_scale(layer, names: list[str], idx: Tensor) -> Tensor | None:
    """Each row's ``g`` ``(batch, out)`` (ones for rows without a DoRA adapter), or None when no row has one."""
    scales = {n: scale(layer, n).float() for n in names if n in layer.lora_magnitude_vector}
    if not scales:
        return None
    ones = torch.ones_like(next(iter(scales.values())))
    return torch.stack([*(scales.get(n, ones) for n in names), ones])[idx]  # (batch, out)


@torch.no_grad()
def merged_weight(layer, name: str, weight: Tensor, base: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(g * (W + s B A), g)`` in fp32 in ``weight``'s layout (unmerging restores the kept weight and replays).

    Args:
        layer: The LoRA layer holding DoRA adapter ``name``.
        name: The adapter.
        weight: The weight to merge into (it may already hold adapters merged before this one).
        base: The weight without any merged adapter, which the norm is taken of, as the forward pass and PEFT
            do (``weight`` itself when None).
    """
    w = weight.float()
    a, b = layer.factors(name)
    in_out = layer.weight_in_out
    norm = row_norm(w if base is None else base.float(), a, b, layer.scaling[name], in_out)
    g = layer.lora_magnitude_vector[name].float().reshape(-1) / norm  # (out,)
    g_view = g[None, :] if in_out else g.view(-1, *([1] * (w.dim() - 1)))
    return g_view * (w + layer.delta_weight(name)), g
