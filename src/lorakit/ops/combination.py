"""Adapter arithmetic on per-layer factors: exact weighted sums, SVD re-projection, TIES and DARE merges.

For adapters ``i`` with weights ``w_i`` and updates ``dW_i = s_i B_i A_i`` on a layer:

* **linear** (PEFT's "cat") is exact: ``A' = cat_i(A_i)`` (rows), ``B' = cat_i(w_i s_i B_i)`` (columns) and
  scaling 1, so ``B' A' = sum_i w_i dW_i`` and the rank is ``sum_i r_i``.
* **svd** re-projects that exact sum to rank ``k`` by truncated SVD (the best rank-k approximation in Frobenius
  norm, Eckart-Young), computed from the factors without forming the ``(out, in)`` matrix.
* **ties** (Yadav et al. 2023, "TIES-Merging"): on the full ``dW_i``, keep each one's top ``density`` fraction
  of entries by magnitude (trim), elect a sign per entry from the sum of the trimmed tensors (or from the count
  of signs with ``majority_sign="frequency"``), then average, per entry, the weighted values ``w_i dW_i`` whose
  sign agrees (disjoint mean: divided by how many agree, not by the weights); then SVD back to rank ``k``.
* **dare_linear** (Yu et al. 2023, "DARE"): drop each entry of each ``dW_i`` with probability ``p = 1 - density``
  and rescale the kept ones by ``1 / (1 - p)`` (unbiased), then the weighted sum, then SVD to rank ``k``.
  **dare_ties** drops the same way, then elects signs and takes the disjoint mean as in TIES.
* **magnitude_prune**: the trim step of TIES, then the weighted sum, then SVD to rank ``k``.

These are PEFT's ``add_weighted_adapter`` combination types "cat", "svd", "ties_svd", "dare_linear_svd",
"dare_ties_svd" and "magnitude_prune_svd" (PEFT's "linear" mixes A and B separately, which is not a sum of
updates; lorakit does not offer it). DARE's random masks are seeded per layer (from ``seed`` and the layer path),
so a layer's result does not depend on which other layers the adapters have.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lorakit.ops.factors import LayerFactors, check_compatible, factors_from_svd, lowrank_svd

SVD_METHODS = ("svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = ("linear", *SVD_METHODS)
ALIASES = {"cat": "linear", **{f"{m}_svd": m for m in SVD_METHODS if m != "svd"}}
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def magnitude_trim(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (TIES step 1)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(k).indices] = 1
    return delta * mask.reshape(delta.shape)


def random_drop(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Keep each entry with probability ``density`` and rescale the kept ones by ``1 / density`` (DARE)."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def disjoint_mean(trimmed: Tensor, weights: Tensor, majority_sign: str = "total") -> Tensor:
    """TIES steps 2-3: elect a sign per entry, average the weighted entries that agree with it.

    Args:
        trimmed: ``(n, out, in)`` trimmed (or dropped) updates.
        weights: ``(n,)`` weights.
        majority_sign: "total" elects ``sign(sum_i dW_i)``; "frequency" elects ``sign(sum_i sign(dW_i))``.
            A tie (0) elects +.
    """
    sign = trimmed.sign()
    votes = trimmed.sum(0) if majority_sign == "total" else sign.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(trimmed.dtype)  # (out, in)
    agree = (sign == elected).to(trimmed.dtype)  # (n, out, in); zeros never agree
    weighted = trimmed * weights.to(trimmed.dtype)[:, None, None]
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1.0)


def linear(layers: Sequence[LayerFactors], weights: Sequence[float]) -> LayerFactors:
    """The exact weighted sum of one layer's updates by concatenating ranks (scaling 1)."""
    dtype = _common_dtype(layers)
    a = torch.cat([f.a.to(dtype) for f in layers], dim=0)  # (sum r, in)
    b = torch.cat([f.b.to(dtype) * (w * f.scaling) for f, w in zip(layers, weights)], dim=1)  # (out, sum r)
    return layers[0].replace(a.contiguous(), b.contiguous(), 1.0)


def _full_delta(
    layers: Sequence[LayerFactors],
    weights: Sequence[float],
    method: str,
    density: float,
    majority_sign: str,
    generator: torch.Generator,
) -> Tensor:
    """The combined ``(out, in)`` update of one layer for the element-wise methods (fp32, like PEFT)."""
    deltas = [f.delta(torch.float32) for f in layers]
    w = torch.tensor(list(weights), dtype=torch.float32)
    if method in ("ties", "magnitude_prune"):
        deltas = [magnitude_trim(d, density) for d in deltas]
    else:  # dare_linear, dare_ties
        deltas = [random_drop(d, density, generator) for d in deltas]
    stacked = torch.stack(deltas)  # (n, out, in)
    if method in ("ties", "dare_ties"):
        return disjoint_mean(stacked, w, majority_sign)
    return (stacked * w[:, None, None]).sum(0)


def combine_layer(
    path: str,
    layers: Sequence[LayerFactors],
    weights: Sequence[float],
    method: str,
    rank: int | None,
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
) -> LayerFactors:
    """Combine one layer's updates (``layers[i]`` weighted by ``weights[i]``); see the module docstring."""
    if method == "linear":
        return linear(layers, weights)
    rank = rank or max(f.rank for f in layers)
    if method == "svd":
        u, s, vh = lowrank_svd(linear(layers, weights))
    else:
        gen = torch.Generator().manual_seed(layer_seed(seed, path))
        delta = _full_delta(layers, weights, method, density, majority_sign, gen)  # (out, in)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return factors_from_svd(layers[0], u, s, vh, rank, 1.0, seed=layer_seed(seed, path), dtype=_common_dtype(layers))


def combine_factors(
    adapters: Sequence[Mapping[str, LayerFactors]],
    weights: Sequence[float],
    method: str = "linear",
    rank: int | None = None,
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
    labels: Sequence[str] | None = None,
) -> dict[str, LayerFactors]:
    """Combine whole adapters layer by layer (arguments are assumed validated; see `lorakit.combine`).

    A layer that only some adapters have is combined from those (the others contribute a zero update).
    Every result has scaling 1. With an SVD method, ``rank=None`` means the largest rank of any input layer
    (PEFT's default), so every output layer has the same rank.

    Raises:
        IncompatibleAdapterError: a layer has different shapes in two adapters (the error names it).
    """
    method = ALIASES.get(method, method)
    paths = check_compatible(adapters, labels)
    if method != "linear" and rank is None:
        rank = max(f.rank for layers in adapters for f in layers.values())
    out: dict[str, LayerFactors] = {}
    for path in paths:
        present = [(layers[path], w) for layers, w in zip(adapters, weights) if path in layers]
        fs, ws = [f for f, _ in present], [w for _, w in present]
        out[path] = combine_layer(path, fs, ws, method, rank, density, majority_sign, seed)
    return out


def layer_seed(seed: int, path: str) -> int:
    """A per-layer seed that is stable across processes and Python versions (no ``hash()``)."""
    return (int(seed) * 1_000_003 + zlib.crc32(path.encode())) % (2**63)


def _common_dtype(layers: Sequence[LayerFactors]) -> torch.dtype:
    dtypes = {f.a.dtype for f in layers} | {f.b.dtype for f in layers}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32
