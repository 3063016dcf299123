"""Model-level verbs: add, set, disable, delete, merge, unmerge, unload adapters; count trainable parameters.

The model stays the user's own object. lorakit keeps its bookkeeping (configs, active adapters, the
``requires_grad`` flags from before the first adapter) in one attribute, ``model._lorakit``; the per-layer state
lives in the wrappers. Every verb is explicit and idempotent: nothing merges inside ``train()``, ``eval()`` or
``forward()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterExistsError, AdapterNotFoundError, ConfigError, MergeError
from lorakit.inject import inject, replace_wrappers, resolved_targets, unwrap_empty, with_task_heads
from lorakit.layers import LoraLayer, ModulesToSave, iter_lora_layers
from lorakit.state import trainable_parameters_of

STATE_ATTR = "_lorakit"
RESERVED_NAMES = ("__base__",)


@dataclass
class AdapterState:
    """What lorakit remembers about a model it has injected adapters into."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)  # flags before the first adapter


def _state(model: nn.Module) -> AdapterState:
    state = model.__dict__.get(STATE_ATTR)
    return state if state is not None else AdapterState()


def _wrappers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (their updates add up in forward)."""
    return list(_state(model).active)


def get_config(model: nn.Module, name: str = "default") -> LoraConfig:
    """The config of adapter ``name`` (with ``target_modules`` resolved to what was actually adapted)."""
    _require(model, [name])
    return _state(model).configs[name]


def _require(model: nn.Module, names: Sequence[str]) -> None:
    loaded = list_adapters(model)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise AdapterNotFoundError(
            f"adapter(s) {unknown} not loaded on {type(model).__name__}; loaded adapters: {loaded or 'none'} "
            "(add one with lorakit.add_adapter or lorakit.load_adapter)"
        )


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
    state = model.__dict__.get(STATE_ATTR)
    first = state is None
    if first:
        state = AdapterState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
    config = with_task_heads(model, config)
    try:
        targets = inject(model, config, name)
    except BaseException:
        _remove_from_wrappers(model, name)
        raise
    if first:
        model.__dict__[STATE_ATTR] = state
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
    for wrapper in _wrappers(model):
        if name in wrapper.adapter_names:
            wrapper.delete(name)
    unwrap_empty(model)


def _check_activatable(model: nn.Module, names: list[str]) -> None:
    merged = {n for w in _wrappers(model) if isinstance(w, LoraLayer) for n in w.merged_adapters}
    if merged - set(names):
        raise MergeError(
            f"adapters {sorted(merged)} are merged into the base weights; unmerge(model) before activating {names}"
        )


def set_adapter(model: nn.Module, name: str | Sequence[str]) -> None:
    """Make ``name`` (or several names, whose updates add) the active adapter(s)."""
    names = [name] if isinstance(name, str) else list(name)
    _require(model, names)
    _check_activatable(model, names)
    for wrapper in _wrappers(model):
        wrapper.set_active(names)
    _state(model).active = names


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and free its memory; the last adapter out restores the original modules."""
    _require(model, [name])
    if any(name in w.merged_adapters for w in _wrappers(model) if isinstance(w, LoraLayer)):
        raise MergeError(f"adapter {name!r} is merged into the base weights; call unmerge(model) before deleting it")
    _remove_from_wrappers(model, name)
    state = _state(model)
    state.configs.pop(name)
    state.active = [a for a in state.active if a != name]
    if not state.configs:
        _forget(model, state)


def _forget(model: nn.Module, state: AdapterState) -> None:
    """Drop lorakit's bookkeeping and restore the parameters' ``requires_grad`` flags from before."""
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    model.__dict__.pop(STATE_ATTR, None)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter is bypassed (merged ones are unmerged) until the block exits."""
    wrappers = list(_wrappers(model))
    merged = {id(w): list(w.merged_adapters) for w in wrappers if isinstance(w, LoraLayer)}
    flags = {id(w): w.disable_adapters for w in wrappers}
    try:
        for w in wrappers:
            if isinstance(w, LoraLayer):
                w.unmerge()
            w.disable_adapters = True
        yield model
    finally:
        for w in wrappers:
            w.disable_adapters = flags[id(w)]
            for n in merged.get(id(w), []):
                w.merge(n)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Add the updates of ``names`` (default: the active adapters) into the base weights; idempotent."""
    names = active_adapters(model) if names is None else [names] if isinstance(names, str) else list(names)
    _require(model, names)
    inactive = [n for n in names if n not in active_adapters(model)]
    if inactive:
        raise MergeError(f"adapters {inactive} are not active; set_adapter(model, {names!r}) before merging them")
    _merge_layers(model, names)


def _merge_layers(model: nn.Module, names: Sequence[str]) -> None:
    """Merge ``names`` on every layer, all or nothing: a failure unmerges what this call merged."""
    _check_untied(model, names)
    done: list[tuple[LoraLayer, str]] = []
    for path, layer in iter_lora_layers(model):
        for n in names:
            if n not in layer.r or n in layer.merged_adapters:
                continue
            try:
                layer.merge(n)
            except MergeError as exc:
                for merged_layer, merged_name in reversed(done):
                    merged_layer.unmerge(merged_name)
                raise MergeError(f"{path}: {exc}; nothing was merged") from exc
            done.append((layer, n))


def _check_untied(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse to merge into a weight another module shares (tied embeddings): the update would change both."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    tied = [
        f"{path} (shares its weight with {[o for o in owners[id(layer.weight)] if not o.startswith(path + '.')]})"
        for path, layer in iter_lora_layers(model)
        if len(owners.get(id(layer.weight), ())) > 1
        and any(n in layer.r and n not in layer.merged_adapters for n in names)
    ]
    if tied:
        raise MergeError(
            f"cannot merge {list(names)} into tied weights: {'; '.join(tied)}; merging would also change the other "
            "module (e.g. tied input/output embeddings). Keep the adapter unmerged, or untie the weights first "
            "(e.g. load the model with tie_word_embeddings=False)"
        )


def unmerge(model: nn.Module) -> None:
    """Subtract every merged update from the base weights again (no-op when nothing is merged)."""
    for wrapper in _wrappers(model):
        if isinstance(wrapper, LoraLayer):
            wrapper.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every wrapper by the original module class and forget all adapters.

    Args:
        model: The model with adapters.
        merge: Fold the active adapters into the weights (and keep trained ``modules_to_save`` copies); with
            False the untouched base model comes back.

    Returns:
        ``model`` itself, now a plain model (e.g. a transformers model whose ``save_pretrained`` output loads
        without lorakit).
    """
    state = _state(model)
    if merge:
        _merge_layers(model, state.active)  # all or nothing, before any wrapper is replaced
    replace_wrappers(model, merge=merge)
    _forget(model, state)
    return model


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
