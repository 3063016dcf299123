"""`LayerFactors`: one layer's LoRA update ``scaling * B A`` as plain tensors, and the exact low-rank SVD of it.

Everything in `lorakit.ops` works on ``{layer_path: LayerFactors}`` dicts: no model, no files. ``A`` is kept
flattened to ``(r, in)`` and ``B`` to ``(out, r)`` whatever the module type, so the arithmetic is written once;
``kind`` and ``a_tail`` say how to put them back (conv kernels, PEFT's embedding layout).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.errors import IncompatibleAdapterError

KINDS = ("linear", "embedding", "conv")


@dataclass(frozen=True)
class LayerFactors:
    """The update of one layer: ``delta = scaling * b @ a``.

    Attributes:
        a: ``(r, in)``; for convs the flattened ``(r, in_channels * prod(kernel))``.
        b: ``(out, r)``.
        scaling: The adapter's ``alpha / r`` (or ``alpha / sqrt(r)``) on this layer.
        kind: "linear", "embedding" (PEFT's ``lora_embedding_A/B``: ``in`` is the vocabulary) or "conv".
        a_tail: For convs, A's trailing shape ``(in_channels, *kernel)``; ``()`` otherwise.
        fan_in_fan_out: The base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``).
    """

    a: Tensor
    b: Tensor
    scaling: float
    kind: str = "linear"
    a_tail: tuple[int, ...] = ()
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``scaling * B A`` as an ``(out, in)`` matrix (not the base weight's layout; see `base_shape`)."""
        return (self.b.to(dtype) @ self.a.to(dtype)) * self.scaling  # (out, in)

    def base_shape(self) -> tuple[int, ...]:
        """The shape of the base module's weight that this update is added to."""
        if self.kind == "embedding":
            return (self.in_features, self.out_features)  # (num_embeddings, dim)
        if self.kind == "conv":
            return (self.out_features, *self.a_tail)
        return (self.in_features, self.out_features) if self.fan_in_fan_out else (self.out_features, self.in_features)

    def replace(self, a: Tensor, b: Tensor, scaling: float) -> LayerFactors:
        """The same layer with new factors (rank may change)."""
        return dataclasses.replace(self, a=a, b=b, scaling=float(scaling))


def lowrank_svd(f: LayerFactors) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD of ``scaling * B A`` without forming the ``(out, in)`` matrix, in float64.

    With ``B = Qb Rb`` and ``A^T = Qa Ra`` (reduced QR), ``B A = Qb (Rb Ra^T) Qa^T``, so the SVD of the small
    ``r x r`` core gives the whole SVD: ``U = Qb Uc``, ``Vh = Vhc Qa^T``. Cost O((out + in) r^2), not O(out in r).

    Returns:
        ``(U (out, k), S (k,), Vh (k, in))`` with ``k = min(r, out, in)``, singular values descending.
    """
    b = f.b.to(torch.float64)  # (out, r)
    a = f.a.to(torch.float64)  # (r, in)
    qb, rb = torch.linalg.qr(b)  # (out, k1), (k1, r)
    qa, ra = torch.linalg.qr(a.T)  # (in, k2), (k2, r)
    core = (rb @ ra.T) * f.scaling  # (k1, k2)
    uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return qb @ uc, s, vhc @ qa.T  # (out, k), (k,), (k, in)


def factors_from_svd(
    template: LayerFactors,
    u: Tensor,
    s: Tensor,
    vh: Tensor,
    rank: int,
    scaling: float,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> LayerFactors:
    """Factors of rank ``rank`` with ``scaling * B A = U_k diag(S_k) Vh_k`` (the best rank-k approximation).

    The singular values are split evenly (``B = U sqrt(S / scaling)``, ``A = sqrt(S / scaling) Vh``) so neither
    factor is badly scaled for further training. Asking for more directions than the update has pads it: the
    extra columns of B are zero (the update is unchanged) and the extra rows of A are random as in a fresh LoRA,
    so the padded rank can still learn.
    """
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()  # (k,)
    b = u[:, :k] * root  # (out, k)
    a = root[:, None] * vh[:k]  # (k, in)
    if rank > k:
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(rank - k, a.shape[1], generator=gen, dtype=a.dtype) / a.shape[1] ** 0.5
        a = torch.cat([a, extra])  # (rank, in)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)  # (out, rank)
    dtype = dtype or template.a.dtype
    return template.replace(a.to(dtype).contiguous(), b.to(dtype).contiguous(), scaling)


def check_compatible(adapters: Sequence[Mapping[str, LayerFactors]], labels: Sequence[str] | None = None) -> list[str]:
    """Every layer path in any of ``adapters``, after checking that shared layers have the same shape and kind.

    Raises:
        IncompatibleAdapterError: naming every layer whose input/output size, kernel, kind or weight layout
            differs between two adapters (they were trained on different base models).
    """
    labels = list(labels) if labels is not None else [f"adapter {i}" for i in range(len(adapters))]
    first: dict[str, tuple[str, LayerFactors]] = {}
    problems: list[str] = []
    for label, layers in zip(labels, adapters):
        for path, f in layers.items():
            if path not in first:
                first[path] = (label, f)
                continue
            other_label, g = first[path]
            mine, theirs = _signature(f), _signature(g)
            if mine != theirs:
                problems.append(f"{path}: {other_label} has {theirs}, {label} has {mine}")
    if problems:
        shown = "; ".join(problems[:6]) + (f" ... ({len(problems)} layers)" if len(problems) > 6 else "")
        raise IncompatibleAdapterError(
            f"the adapters do not fit the same base model: {shown}. Only adapters trained on the same base "
            "(same layer shapes) can be combined."
        )
    return sorted(first, key=module_order)


def module_order(path: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10`` (numbers compared as numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path)]


def _signature(f: LayerFactors) -> str:
    return f"{f.kind} weight {tuple(f.base_shape())}" + (" (fan_in_fan_out)" if f.fan_in_fan_out else "")
