"""Model-level verbs: add, set, disable, delete, merge, unmerge, unload adapters; count trainable parameters.

The model stays the user's own object. lorakit keeps its bookkeeping (configs, active adapters, the
``requires_grad`` flags from before the first adapter) in one `lorakit.model_state.AdapterState` on the model;
the per-layer state lives in the wrappers. Every verb is explicit and idempotent: nothing merges inside
``train()``, ``eval()`` or ``forward()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterExistsError, ConfigError, MergeError
from lorakit.inject import inject, resolved_targets, unwrap_empty, with_task_heads
from lorakit.model_state import (
    AdapterState,
    attach_state,
    forget,
    has_state,
    merged_names,
    require_loaded,
    state_of,
    wrappers,
)
from lorakit.routing import Route, activate
from lorakit.state import trainable_parameters_of

RESERVED_NAMES = ("__base__",)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(state_of(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (their updates add up in forward)."""
    return list(state_of(model).active)


def get_config(model: nn.Module, name: str = "default") -> LoraConfig:
    """The config of adapter ``name`` (with ``target_modules`` resolved to what was actually adapted)."""
    require_loaded(model, [name])
    return state_of(model).configs[name]


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or name in RESERVED_NAMES:
        raise ConfigError(
            f"adapter name {name!r} is invalid: use a non-empty string without '.', not one of {RESERVED_NAMES}"
        )
    if name in list_adapters(model):
        raise AdapterExistsError(
            f"an adapter named {name!r} is already loaded; pick another name or delete_adapter(model, {name!r}) first"
        )


def _model_name(model: nn.Module) -> str | None:
    name = getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def add_adapter(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    *,
    activate: bool = True,
    trainable: bool = True,
) -> nn.Module:
    """Inject a new adapter into ``model`` in place and return ``model``.

    The base model is frozen from the first adapter on. With ``trainable`` (the default) every parameter except
    this adapter's (and its ``modules_to_save`` copies and, with ``bias`` != "none", the biases it trains) is
    frozen; otherwise the adapter's own parameters are frozen too and other adapters keep their flags.
    New modules take the model's current train/eval mode.

    Args:
        model: Any ``nn.Module`` (a transformers model stays one: ``generate``, ``save_pretrained`` keep working).
        config: What to adapt and how.
        name: Adapter name (no '.').
        activate: Make this the (only) active adapter.
        trainable: Freeze everything but this adapter.

    Raises:
        AdapterExistsError: ``name`` is already loaded.
        TargetNotFoundError: ``config.target_modules`` matched nothing.
    """
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    _check_new_name(model, name)
    if activate:
        _check_activatable(model, [name])  # before injecting: a refused add must leave the model as it was
    first = not has_state(model)
    if first:
        state = AdapterState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    else:
        state = state_of(model)
    config = with_task_heads(model, config)
    try:
        targets = inject(model, config, name)
    except BaseException:
        _remove_from_wrappers(model, name)
        raise
    if first:
        attach_state(model, state)
    fan_in_fan_out = any(getattr(model.get_submodule(t), "fan_in_fan_out", False) for t in targets)
    state.configs[name] = dataclasses.replace(
        config,
        target_modules=resolved_targets(model, targets),
        fan_in_fan_out=config.fan_in_fan_out or fan_in_fan_out,
        base_model_name_or_path=config.base_model_name_or_path or _model_name(model),
    )
    if trainable or first:  # the base is frozen from the first adapter on
        for p in model.parameters():
            p.requires_grad_(False)
    for p in trainable_parameters_of(model, name, config.bias):
        p.requires_grad_(trainable)
    if activate:
        set_adapter(model, name)
    return model


def _remove_from_wrappers(model: nn.Module, name: str) -> None:
    for wrapper in wrappers(model):
        if name in wrapper.adapter_names:
            wrapper.delete(name)
    unwrap_empty(model)


def _check_activatable(model: nn.Module, names: list[str]) -> None:
    merged = merged_names(model)
    if set(merged) - set(names):
        raise MergeError(
            f"adapters {merged} are merged into the base weights; unmerge(model) before activating {names}"
        )


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make ``name`` (or several names, whose updates add) the active adapter(s)."""
    names = [name] if isinstance(name, str) else list(name)
    require_loaded(model, names)
    _check_activatable(model, names)
    for wrapper in wrappers(model):
        wrapper.set_active(names)
    state_of(model).active = names


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and free its memory; the last adapter out restores the original modules."""
    require_loaded(model, [name])
    if name in merged_names(model):
        raise MergeError(f"adapter {name!r} is merged into the base weights; call unmerge(model) before deleting it")
    _remove_from_wrappers(model, name)
    state = state_of(model)
    state.configs.pop(name)
    state.active = [a for a in state.active if a != name]
    if not state.configs:
        forget(model)


@contextmanager
def route(model: nn.Module, rows: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run each row of the batch with its own adapter: ``rows[i]`` names row i's adapter (None / "__base__": none).

    Inside the block, forward and ``generate`` apply the routed adapters with batched matmuls over stacked
    factors (mixed ranks and target sets are fine); the active adapter set is ignored. Gradients reach only
    each row's adapter, so several adapters can train in one step on one shared base.

    Raises:
        AdapterNotFoundError: a name is not loaded (checked before anything changes).
        MergeError: an adapter is merged into the base weights (it would apply to every row).
    """
    names = [None if r in (None, *RESERVED_NAMES) else r for r in rows]
    if any(n is not None and not isinstance(n, str) for n in names):
        raise ConfigError(f"route rows must be adapter names or None, got {list(rows)!r}")
    require_loaded(model, sorted({n for n in names if n is not None}))
    merged = merged_names(model)
    if merged:
        raise MergeError(f"adapters {merged} are merged into the base weights; unmerge(model) before routing rows")
    with activate(Route(tuple(names))):
        yield model


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly the adapters ``names`` trainable (e.g. to train several at once through `route`)."""
    names = [names] if isinstance(names, str) else list(names)
    require_loaded(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        for p in trainable_parameters_of(model, n, get_config(model, n).bias):
            p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return a PEFT-style one-line summary of trainable parameters."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / max(total, 1)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
    print(line)
    return line
