"""Per-row routing (``lorakit.route``): each row of a batch gets its own adapter's update, vectorized.

A `Route` (see `lorakit.routing`) names one adapter (or None) per row. For each LoRA layer the rows are mapped to
slots of a stack of that layer's adapters; layer types with a vectorized path (`LoraLinear`, `LoraEmbedding`)
apply every row's factors with batched matmuls over those stacks (BGMV-style), others run one pass per adapter
over its rows. Rows routed to None, or to an adapter this layer does not have, get a zero update.

Two caches, both dropped automatically: the stacks live on the layer (`LoraLayer.stack_cache`) until an adapter is
added, removed or changed (tensor version counters tell), so new routes (a request joining a served batch) reuse
them; the per-route plan and per-row factors live on the route, so the decode steps of one ``generate`` reuse them.
Neither cache is used while autograd records (training through a route).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.routing import Route

if TYPE_CHECKING:
    from lorakit.layers.base import LoraLayer


def routed_delta(layer: LoraLayer, x: Tensor, route: Route) -> Tensor | None:
    """Each row's own adapter update of ``x`` on ``layer`` (None when no row has an adapter on this layer)."""
    route.check_batch(x.shape[0])
    plan = route_plan(layer, route, x.device)
    if plan is None:
        return None
    names, idx = plan
    vectorized = getattr(layer, "routed_update", None)
    return vectorized(x, names, idx, route) if vectorized is not None else _per_adapter(layer, x, names, idx)


def route_plan(layer: LoraLayer, route: Route, device: torch.device) -> tuple[list[str], Tensor] | None:
    """``(names, idx)``: this layer's routed adapters and each row's slot in them (``len(names)``: none).

    Names come in first-appearance order. The plan depends only on the route: computed once per route.
    """
    grad = torch.is_grad_enabled()
    key = (id(layer), "plan", grad)
    if key not in route.cache:
        names = [n for n in dict.fromkeys(route.rows) if n is not None and n in layer.r]
        if names and not grad:
            names = list(layer.r)  # inference: one stack of every adapter, shared by all routes
        slot = {n: i for i, n in enumerate(names)}
        idx = torch.tensor([slot.get(n, len(names)) for n in route.rows], device=device)  # (batch,)
        route.cache[key] = (names, idx) if names else None
    return route.cache[key]


def _per_adapter(layer: LoraLayer, x: Tensor, names: list[str], idx: Tensor) -> Tensor:
    """Fallback for layer types without a vectorized path: one pass per adapter over its rows."""
    out = None
    for i, name in enumerate(names):
        rows = (idx == i).nonzero().squeeze(1)
        delta = layer.lora_forward(x.index_select(0, rows), name)
        out = delta.new_zeros((x.shape[0], *delta.shape[1:])) if out is None else out
        out = out.index_add(0, rows, delta)
    return out


def stacked_factors(layer: LoraLayer, names: list[str], cache: bool = True) -> tuple[Tensor, Tensor]:
    """``A^T`` stacked to ``(k+1, in, R)`` and ``(scaling * B)^T`` to ``(k+1, R, out)``; the last slot is zero.

    Ranks differ between adapters: each factor is zero-padded to the largest rank R, which adds exact zeros
    (``B A`` is unchanged). Without autograd the stacks are kept in ``layer.stack_cache``.
    """
    cache = cache and not torch.is_grad_enabled()
    factors = [layer.factors(n) for n in names]
    key = (tuple(names), tuple((id(t), t._version) for pair in factors for t in pair))
    if cache and layer.stack_cache is not None and layer.stack_cache[0] == key:
        return layer.stack_cache[1]
    rank = max(layer.r[n] for n in names)
    a_list, b_list = [], []
    for n, (a, b) in zip(names, factors):
        a_list.append(F.pad(a, (0, 0, 0, rank - layer.r[n])).T)  # (in, R)
        b_list.append(F.pad(b * layer.scaling[n], (0, rank - layer.r[n])).T)  # (R, out)
    stacks = (
        torch.stack([*a_list, torch.zeros_like(a_list[0])]),  # (k+1, in, R)
        torch.stack([*b_list, torch.zeros_like(b_list[0])]),  # (k+1, R, out)
    )
    if cache:
        layer.stack_cache = (key, stacks)
    return stacks


def row_factors(layer: LoraLayer, names: list[str], idx: Tensor, route: Route) -> tuple[Tensor, Tensor]:
    """Each row's ``A^T`` ``(batch, in, R)`` and ``(scaling * B)^T`` ``(batch, R, out)`` (zeros: no update).

    When every row has its own adapter, in order, the per-row factors are a slice of the stacks (no copy);
    otherwise they are gathered. Without autograd they are cached on the route.
    """
    key = (id(layer), "rows")
    cache = not torch.is_grad_enabled()
    if cache and key in route.cache:
        return route.cache[key]
    a_stack, b_stack = stacked_factors(layer, names)
    rows = idx.numel()
    if len(names) == rows and torch.equal(idx, torch.arange(rows, device=idx.device)):
        result = a_stack[:rows], b_stack[:rows]
    else:
        result = a_stack[idx], b_stack[idx]
    if cache:
        route.cache[key] = result
    return result


def routed_dropout(layer: LoraLayer, x: Tensor, names: list[str], idx: Tensor) -> Tensor:
    """Each row's adapter's dropout on its input (identity in eval mode or when every p is 0)."""
    ps = [m.p if isinstance(m, nn.Dropout) else 0.0 for m in (layer.lora_dropout[n] for n in names)]
    if not layer.training or not any(ps):
        return x
    keep = 1.0 - torch.tensor([*ps, 0.0], device=x.device, dtype=x.dtype)[idx]  # (batch,)
    keep = keep.view(-1, *([1] * (x.dim() - 1)))
    return x * torch.bernoulli(keep.expand_as(x)) / keep
