"""What lorakit remembers about a model it injected adapters into, in one small public type.

The model stays the user's own object: lorakit keeps one `AdapterState` on it, as the plain attribute
``model.lorakit_state`` (not a submodule, so it is invisible to ``state_dict()``, ``.to()`` and optimizers), and
the per-layer state lives in the wrappers. `lorakit.adapters` and `lorakit.merging` both read it through the
functions here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterNotFoundError
from lorakit.layers import LoraLayer, ModulesToSave

STATE_ATTR = "lorakit_state"


@dataclass
class AdapterState:
    """Adapters on one model: their configs, which are active, and ``requires_grad`` flags from before the first."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)


def state_of(model: nn.Module) -> AdapterState:
    """The model's `AdapterState` (an empty one, not attached, when it has no adapters)."""
    state = model.__dict__.get(STATE_ATTR)
    return state if state is not None else AdapterState()


def has_state(model: nn.Module) -> bool:
    """True once an adapter was added (and until the last one is deleted or the model unloaded)."""
    return model.__dict__.get(STATE_ATTR) is not None


def attach_state(model: nn.Module, state: AdapterState) -> None:
    """Keep ``state`` on ``model`` (stored in ``__dict__`` directly: nn.Module must not register it)."""
    model.__dict__[STATE_ATTR] = state


def forget(model: nn.Module) -> None:
    """Drop the bookkeeping and restore the parameters' ``requires_grad`` flags from before the first adapter."""
    state = state_of(model)
    for n, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(n, p.requires_grad))
    model.__dict__.pop(STATE_ATTR, None)


def wrappers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    """Every LoRA layer and ``modules_to_save`` wrapper in ``model``, in module order."""
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield module


def merged_names(model: nn.Module) -> list[str]:
    """Names of the adapters merged into some base weight of ``model`` (sorted)."""
    return sorted({n for w in wrappers(model) if isinstance(w, LoraLayer) for n in w.merged_adapters})


def require_loaded(model: nn.Module, names: Sequence[str]) -> None:
    """Raise `AdapterNotFoundError` naming every one of ``names`` that is not loaded on ``model``."""
    loaded = list(state_of(model).configs)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise AdapterNotFoundError(
            f"adapter(s) {unknown} not loaded on {type(model).__name__}; loaded adapters: {loaded or 'none'} "
            "(add one with lorakit.add_adapter or lorakit.load_adapter)"
        )
