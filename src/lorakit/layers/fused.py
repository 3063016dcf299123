"""One matmul for the LoRA ``A`` of projections that share an input (q/k/v of an attention block, gate/up of an MLP).

Hugging Face Llama-style blocks call ``q_proj``, ``k_proj`` and ``v_proj`` (and ``gate_proj``, ``up_proj``) with
the very same ``hidden_states`` tensor. Their down-projections can then run as one matmul,
``h_cat = x @ cat(A_q, A_k, A_v).T``, split into each layer's ``h``; autograd gives ``dA_cat = dh_cat^T x`` and the
input gradient ``dh_cat @ A_cat`` as one matmul each (instead of three, plus two dense additions of ``(n, in)``
input gradients). Each layer still applies its own ``scaling * B h``: the arithmetic is the plain formula's.

How: `link_siblings` (called by injection) gives the LoRA layers of one such set a shared `SiblingGroup`. The first
member called with ``x`` computes every eligible member's ``h`` and keeps the others' slices, keyed on the identity
of ``x`` (``is``, not equal values); a member called with that same object takes its slice, any other input runs
the ordinary per-layer path. The slices never outlive the parent module's forward (a hook clears them, also when
the forward raises), so no tensor is held between forwards.

Fusion applies only when it is exactly the same math: one active, unmerged adapter per layer, no per-row routing,
dropout off (p == 0 or eval mode: per-layer dropout masks cannot be shared), matching dtypes and devices, and not
while torch.compile traces (the compiled graph takes the per-layer path). Anything else takes the per-layer path.

It is off by default: on CPU (1 thread, SmolLM2-135M, r=16, dropout 0) a training step at 4 x 256 measured
1.02-1.05x and a prompt forward 0.94-1.03x the per-layer time, i.e. no gain beyond noise (the A matmuls are a tiny
share of the step); not yet measured on CUDA. See ``benchmarks/bench_fused_a.py``. Switch it with `set_fused_a`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers.linear import LoraLinear
from lorakit.routing import current_route

# Names of sibling projections that Llama-style blocks call with one input tensor (same parent module).
SIBLING_SETS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))

_FUSED_A = False


def set_fused_a(enabled: bool) -> None:
    """Compute the ``A`` of sibling projections (q/k/v, gate/up) with one matmul when exact (process-wide switch)."""
    global _FUSED_A
    _FUSED_A = bool(enabled)


def fused_a_enabled() -> bool:
    """Whether `set_fused_a` switched sibling fusion on."""
    return _FUSED_A


def fusable_adapter(layer: nn.Module) -> str | None:
    """The adapter whose ``A`` this layer may share a matmul for, or None when it must take the per-layer path."""
    if layer.disable_adapters or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name in layer.merged_adapters:
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return None
    return name


class _Stash:
    """``h`` slices computed for members not yet called, valid only for the very input ``x`` (and modes)."""

    __slots__ = ("x", "key", "pending")

    def __init__(self, x: Tensor, key: tuple, pending: dict[int, tuple[str, Tensor]]) -> None:
        self.x, self.key, self.pending = x, key, pending


class SiblingGroup:
    """LoRA layers of one parent module that are called with the same input tensor (see the module docstring)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.stash: _Stash | None = None
        self.handle = None  # the parent's forward hook that clears the stash

    def clear(self, *_args) -> None:
        """Drop every kept slice (the parent's forward hook, run even when the forward raises)."""
        self.stash = None

    def delta(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        """``scaling * B A x`` of ``layer`` through the shared matmul, or None: take the per-layer path."""
        if not _FUSED_A or torch.compiler.is_compiling() or current_route() is not None:
            return None
        name = fusable_adapter(layer)
        if name is None:
            return None
        key = (torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        slot = self.layers.index(layer)
        stash = self.stash
        if stash is not None:
            kept = stash.pending.pop(slot, None)
            if not stash.pending:
                self.stash = None
            if kept is not None and stash.x is x and stash.key == key and kept[0] == name:
                return _up(layer, name, kept[1])
        h = self._compute(layer, name, slot, x, key)
        return None if h is None else _up(layer, name, h)

    def _compute(self, layer: nn.Module, name: str, slot: int, x: Tensor, key: tuple) -> Tensor | None:
        """``layer``'s ``h`` from one matmul over every eligible member; the others' slices are kept for them."""
        a = layer.lora_A[name].weight
        if x.dtype != a.dtype and not key[1]:  # the per-layer path casts x; sharing a cast copy would save it
            return None
        members = [(slot, name, a)]
        for i, other in enumerate(self.layers):
            other_name = fusable_adapter(other) if i != slot else None
            if other_name is not None:
                other_a = other.lora_A[other_name].weight
                if other_a.dtype == a.dtype and other_a.device == a.device and other_a.shape[1] == a.shape[1]:
                    members.append((i, other_name, other_a))
        if len(members) < 2:
            return None
        a_cat = torch.cat([m[2] for m in members])  # (R, in), R = sum of ranks
        h_cat = F.linear(x, a_cat)  # (..., R): autograd saves x (shared) and the small a_cat
        parts = h_cat.split([m[2].shape[0] for m in members], dim=-1)
        self.stash = _Stash(x, key, {m[0]: (m[1], h) for m, h in zip(members[1:], parts[1:])})
        return parts[0]


def _up(layer: nn.Module, name: str, h: Tensor) -> Tensor:
    """``scaling * B h``: ``(..., r) -> (..., out)``."""
    return F.linear(h, layer.lora_B[name].weight) * layer.scaling[name]


def _lora_children(parent: nn.Module, names: Iterable[str]) -> list[LoraLinear]:
    found = [parent._modules.get(n) for n in names]
    return [m for m in found if isinstance(m, LoraLinear) and m.fusable_base]


def link_siblings(model: nn.Module) -> None:
    """Give each set of sibling LoRA layers (`SIBLING_SETS`, same parent, same width) one `SiblingGroup`."""
    unlink_siblings(model)
    for parent in model.modules():
        for names in SIBLING_SETS:
            layers = _lora_children(parent, names)
            if len(layers) < 2 or len({m.in_features for m in layers}) != 1:
                continue
            group = SiblingGroup(layers)
            group.handle = parent.register_forward_hook(group.clear, always_call=True)
            parent.__dict__.setdefault("_sibling_groups", []).append(group)  # the parent owns the hook
            for m in layers:
                m.__dict__["_sibling_group"] = group


def unlink_siblings(model: nn.Module) -> None:
    """Remove every `SiblingGroup` and its hook from ``model`` (also of layers already unwrapped)."""
    for module in model.modules():
        module.__dict__.pop("_sibling_group", None)
        for group in module.__dict__.pop("_sibling_groups", ()):
            group.handle.remove()
