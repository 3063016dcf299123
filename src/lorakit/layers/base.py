"""`LoraLayer`: the one place that owns adapter bookkeeping, forward composition and merge/unmerge.

A LoRA layer wraps (never copies or subclasses) a frozen base module, kept at ``.base_layer``, and adds for each
named adapter a low-rank update (Hu et al. 2021, eq. 3): ``h = base(x) + scaling * B(A(dropout(x)))``.
Subclasses only say how to create ``A``/``B`` for their module type, how to run the low-rank branch, and how to
express ``scaling * B A`` in the base weight's layout (`delta_weight`); merging is written once, here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lorakit.config import lora_scaling
from lorakit.errors import AdapterNotFoundError, MergeError
from lorakit.layers import dora
from lorakit.layers.routed import route_plan, routed_delta
from lorakit.routing import Route, current_route


class LoraLayer(nn.Module):
    """Base class of every LoRA wrapper. Subclasses set `adapter_attrs` and implement the abstract methods."""

    # Attributes (nn.ModuleDict / nn.ParameterDict keyed by adapter name) that hold an adapter's factors.
    adapter_attrs: tuple[str, ...] = ("lora_A", "lora_B", "lora_magnitude_vector")
    # False where the branch's input is not something dropout applies to (an embedding's token ids).
    dropout_on_input: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only -> m, PEFT's shape (`magnitude_shape`)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # The base weight as it was before the first merge, kept while any adapter is merged, so that unmerging
        # restores it bit for bit (see `unmerge`). A plain attribute, not a buffer: never saved or moved.
        self.weight_before_merge: Tensor | None = None
        self.disable_adapters = False
        # Stacked factors of this layer's adapters for per-row routing, with the key they were built for
        # (`lorakit.layers.routed.stacked_factors`); not a buffer: never saved, rebuilt when an adapter changes.
        self.stack_cache: tuple[tuple, tuple[Tensor, Tensor]] | None = None
        self.train(base_layer.training)

    # ---- pass-through attributes that model code reads from the module it thinks it has ------------------
    @property
    def weight(self) -> Tensor:
        """The frozen base weight (model code often reads ``layer.weight.dtype`` / ``.device``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return getattr(self.base_layer, "bias", None)

    @property
    def weight_in_out(self) -> bool:
        """True when the base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``, an embedding table)."""
        return False

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(self.r)

    # ---- to implement per module type ---------------------------------------------------------------------
    def _create_factors(self, name: str, r: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def _init_factors(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def lora_forward(self, x: Tensor, name: str, dropout: bool = True) -> Tensor:
        """The low-rank branch ``scaling * B(A(dropout(x)))`` for adapter ``name`` (``dropout=False``: no dropout)."""
        raise NotImplementedError

    def base_term(self, x: Tensor) -> Tensor:
        """``W x`` without the bias (DoRA's training path with dropout needs it on the dropped-out input)."""
        raise NotImplementedError

    def magnitude_shape(self) -> tuple[int, ...]:
        """Shape of a DoRA magnitude on this layer, PEFT's: one value per output feature."""
        return (self.base_layer.weight.shape[1 if self.weight_in_out else 0],)

    def feature_view(self, v: Tensor, result: Tensor) -> Tensor:
        """``v`` ``(out,)`` or per row ``(batch, out)`` viewed to broadcast over this layer's output ``result``.

        Features are the last dim of a linear or embedding output (conv layers override: channels come first).
        """
        return v if v.dim() == 1 else v.view(v.shape[0], *([1] * (result.dim() - 2)), v.shape[-1])

    def delta_weight(self, name: str) -> Tensor:
        """``scaling * B A`` in the base weight's layout and shape, computed in fp32."""
        raise NotImplementedError

    # ---- adapters -----------------------------------------------------------------------------------------
    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init: bool | str,
        use_rslora: bool,
        use_dora: bool = False,
    ) -> None:
        """Add adapter ``name`` of rank ``r`` to this layer (inactive until `set_active`)."""
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_scaling(r, lora_alpha, use_rslora)
        # nn.Identity returns x itself: with dropout 0 the branch makes no copy of the input.
        self.lora_dropout[name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self._create_factors(name, r, *self.adapter_dtype_device())
        self._init_factors(name, init)
        if use_dora:
            self._init_dora(name)
        for attr in (*self.adapter_attrs, "lora_dropout"):
            if name not in getattr(self, attr):
                continue
            entry = getattr(self, attr)[name]
            if isinstance(entry, nn.Module):
                entry.train(self.training)  # adding to a model in eval mode must not switch dropout on

    def _init_dora(self, name: str) -> None:
        dora.init_magnitude(self, name)

    def is_dora(self, name: str) -> bool:
        """True when adapter ``name`` is a DoRA adapter on this layer."""
        return name in self.lora_magnitude_vector

    def adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """Dtype and device of new adapter factors: the base weight's, fp32 for low-precision bases.

        Small updates vanish in bf16/fp16 optimizer steps, so adapters on such bases are kept in fp32.
        """
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        return dtype, weight.device

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` and free its tensors."""
        self._require(name)
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged into {self.base_layer!r}; unmerge before deleting it")
        for attr in (*self.adapter_attrs, "lora_dropout"):
            if name in getattr(self, attr):
                del getattr(self, attr)[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            table.pop(name)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self.stack_cache = None  # stacked copies of the factors, for routing
        self.__dict__.get("_dora_cache", {}).pop(name, None)

    def set_active(self, names: list[str]) -> None:
        """Activate exactly the adapters in ``names`` that this layer holds (their updates add)."""
        self.active_adapters = [n for n in names if n in self.r]

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        """This adapter's factor tensors, keyed relative to this layer (``lora_A.<name>.weight`` ...)."""
        self._require(name)
        out: dict[str, Tensor] = {}
        for attr in self.adapter_attrs:
            if name not in getattr(self, attr):  # e.g. a DoRA magnitude for a plain LoRA adapter
                continue
            entry = getattr(self, attr)[name]
            if isinstance(entry, nn.Parameter):
                out[f"{attr}.{name}"] = entry
            else:
                out.update({f"{attr}.{name}.{k}": p for k, p in entry.named_parameters()})
        return out

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Trainable parameters of adapter ``name``."""
        yield from self.adapter_tensors(name).values()

    def _require(self, name: str) -> None:
        if name not in self.r:
            raise AdapterNotFoundError(f"adapter {name!r} is not on this layer; it has {self.adapter_names}")

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        route = current_route()
        if route is not None:  # per-row adapters (lorakit.route, see layers/routed.py); the active set does not apply
            return self.routed_forward(result, x, route)
        for name in self.active_adapters:
            if name in self.merged_adapters:  # already inside base_layer.weight
                continue
            result = self.add_update(result, x, name)
        return result

    def add_update(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """``result`` plus adapter ``name``'s update of ``x`` (layer types may do it in fewer kernels)."""
        if self.is_dora(name):
            return dora.add(self, result, x, name)
        return result + self.lora_forward(x, name).to(result.dtype)

    def routed_forward(self, result: Tensor, x: Tensor, route: Route) -> Tensor:
        """The base output plus each row's own update; DoRA rows: ``g_row * (result - bias + delta) + bias``."""
        delta = routed_delta(self, x, route)  # checks the batch and builds the plan
        if delta is None:
            return result
        delta = delta.to(result.dtype)
        g = dora.routed_scale(self, *route_plan(self, route, x.device))  # (batch, out) or None (no DoRA row)
        if g is None:
            return result + delta
        bias = None if self.bias is None else self.feature_view(self.bias, result)
        return dora.combine(result, delta, self.feature_view(g, result), bias)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A (r, in), B (out, r))`` of adapter ``name``, for layers whose update is ``x -> B A x`` (routing)."""
        raise NotImplementedError

    # ---- merge --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Add ``scaling * B A`` into the base weight (idempotent).

        The first merge on this layer keeps a copy of the weight (`weight_before_merge`): one more copy of
        this layer's base weight, in its dtype, until the last merged adapter is unmerged.
        """
        self._require(name)
        if name in self.merged_adapters:
            return
        weight = self.base_layer.weight
        first = not self.merged_adapters
        before = weight.detach().clone() if first else None
        self._merge_into(weight, name)
        if first:
            self.weight_before_merge = before
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        """Take merged updates out again, exactly; ``name=None`` unmerges all.

        Subtracting the update would not give the weight back: ``(W + d) - d`` rounds (in fp32 one merge and
        unmerge changed 16.5% of SmolLM2's adapted weights, in bf16 49%). Instead the weight kept at the first
        merge is copied back and the adapters that stay merged are added again, in their merge order, so the
        result is bit for bit what merging only those would give; with none left it is the original weight.
        """
        names = list(self.merged_adapters) if name is None else [name]
        missing = [n for n in names if n not in self.merged_adapters]
        if missing:
            raise MergeError(f"adapter {missing[0]!r} is not merged on {self.base_layer!r}; nothing to unmerge")
        if not names:
            return
        weight = self.base_layer.weight
        remaining = [n for n in self.merged_adapters if n not in names]
        weight.copy_(self.weight_before_merge)
        for n in remaining:
            self._merge_into(weight, n)
        self.merged_adapters = remaining
        if not remaining:
            self.weight_before_merge = None

    def _merge_into(self, weight: Tensor, name: str) -> None:
        """``weight += scaling * B A`` in place; a DoRA adapter's ``weight = g * (weight + scaling * B A)``.

        DoRA's norm is of the weight without merged adapters (``weight_before_merge`` once one is merged), as
        the forward pass and PEFT take it.
        """
        dora_adapter = self.is_dora(name)
        if dora_adapter:  # the whole new weight
            new = dora.merged_weight(self, name, weight, self.weight_before_merge)[0]
        else:  # the update
            new = self.delta_weight(name)
        if not torch.isfinite(new).all():
            raise MergeError(f"adapter {name!r} has non-finite values on {self.base_layer!r}; refusing to merge")
        if dora_adapter:
            weight.copy_(new.to(weight.dtype))
        else:
            weight.add_(new.to(device=weight.device, dtype=weight.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"adapters={{{ranks}}}, active={self.active_adapters}, merged={self.merged_adapters}"


def kaiming_a(weight: Tensor) -> None:
    """Kaiming-uniform init of A (the default ``nn.Linear`` init, a=sqrt(5)), as in the LoRA reference code."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Yield ``(dotted_path, layer)`` for every LoRA layer in ``model``, in module order."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module
