"""Rank tools on per-layer factors: truncated-SVD resize with the energy kept, and effective rank.

The "energy" of an update is its squared Frobenius norm, ``sum_i sigma_i^2``; keeping the top ``k`` singular
directions keeps ``sum_{i<=k} sigma_i^2 / sum_i sigma_i^2`` of it, and no rank-k factorization keeps more
(Eckart-Young). The effective rank at level ``q`` is the smallest ``k`` that keeps at least ``q`` of the energy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from lorakit.ops.combination import layer_seed
from lorakit.ops.factors import LayerFactors, factors_from_svd, lowrank_svd


def singular_values(f: LayerFactors) -> Tensor:
    """Singular values of ``scaling * B A``, descending, ``min(r, out, in)`` of them (float64)."""
    return lowrank_svd(f)[1]


def energy_kept(s: Tensor, k: int) -> float:
    """Fraction of ``sum s^2`` in the top ``k`` values; 1.0 for a zero update (nothing to lose)."""
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        return 1.0
    return float((s.double()[:k] ** 2).sum()) / total


def effective_rank(s: Tensor, level: float) -> int:
    """Smallest ``k`` with ``energy_kept(s, k) >= level``; 0 for a zero update."""
    energy = s.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = energy.cumsum(0) / total
    # A small tolerance so a rank-3 update is not reported as rank 4 because of a 1e-16 rounding tail.
    return int((cumulative < level - 1e-12).sum()) + 1


@dataclass(frozen=True)
class LayerResize:
    """What resizing did to one layer."""

    rank_before: int
    rank_after: int
    energy_kept: float
    padded: bool  # rank_after > rank_before: extra directions that start at zero


def resize(
    layers: Mapping[str, LayerFactors], rank: int, scaling_for: Callable[[str], float], seed: int = 0
) -> tuple[dict[str, LayerFactors], dict[str, LayerResize]]:
    """Re-factorize every layer to rank ``rank`` by truncated SVD of ``scaling * B A``.

    Args:
        layers: The adapter's factors.
        rank: The new rank (validated by the caller: a positive int).
        scaling_for: The new adapter's scaling per layer path (the new factors absorb it).
        seed: Seed of the random A rows of padded directions (their B columns are zero).

    Returns:
        The new factors and, per layer, the ranks and the fraction of the update's energy kept. A layer whose
        rank is below ``rank`` is zero-padded: its update is unchanged and ``padded`` is True.
    """
    out: dict[str, LayerFactors] = {}
    report: dict[str, LayerResize] = {}
    for path, f in layers.items():
        u, s, vh = lowrank_svd(f)
        out[path] = factors_from_svd(f, u, s, vh, rank, scaling_for(path), seed=layer_seed(seed, path))
        report[path] = LayerResize(f.rank, rank, energy_kept(s, rank), rank > f.rank)
    return out, report
