"""Adapter tensors, selected structurally by walking lorakit's wrappers (never by parameter-name substrings)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lorakit.errors import IncompatibleAdapterError
from lorakit.layers import LoraLayer, ModulesToSave, iter_lora_layers


def _bias_tensors(model: nn.Module, name: str, bias: str) -> dict[str, Tensor]:
    """Biases that belong to the adapter under PEFT's ``bias`` modes ("none", "all", "lora_only")."""
    if bias == "lora_only":
        return {
            f"{path}.base_layer.bias": layer.base_layer.bias
            for path, layer in iter_lora_layers(model)
            if name in layer.r and isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter)
        }
    if bias != "all":
        return {}
    out: dict[str, Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            continue  # its copies are saved whole
        own = module._parameters.get("bias")
        if isinstance(own, nn.Parameter) and not _inside_saved_module(model, path):
            out[f"{path}.bias" if path else "bias"] = own
    return out


def _inside_saved_module(model: nn.Module, path: str) -> bool:
    parts = path.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), ModulesToSave) for i in range(1, len(parts)))


def _saved_module_tensors(model: nn.Module, name: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.adapter_names:
            copy = module.modules_to_save[name]
            out.update({f"{path}.modules_to_save.{name}.{k}": t for k, t in copy.state_dict(keep_vars=True).items()})
    return out


def adapter_state_dict(model: nn.Module, name: str, bias: str = "none") -> dict[str, Tensor]:
    """Every tensor of adapter ``name``, keyed by its name in ``model.state_dict()`` (tensors are live, not copies).

    Args:
        model: A model holding adapter ``name``.
        name: The adapter.
        bias: The adapter's ``bias`` mode; "all" / "lora_only" add the base biases it trains.
    """
    out = {
        f"{path}.{k}": t
        for path, layer in iter_lora_layers(model)
        if name in layer.r
        for k, t in layer.adapter_tensors(name).items()
    }
    out.update(_saved_module_tensors(model, name))
    out.update(_bias_tensors(model, name, bias))
    return out


def trainable_parameters_of(model: nn.Module, name: str, bias: str = "none") -> list[nn.Parameter]:
    """The parameters that training adapter ``name`` updates (buffers of saved modules excluded)."""
    return [t for t in adapter_state_dict(model, name, bias).values() if isinstance(t, nn.Parameter)]


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], name: str, bias: str = "none", source: str = "state dict"
) -> None:
    """Copy ``state`` into adapter ``name``; strict: every problem is collected into one error, nothing is copied.

    Raises:
        IncompatibleAdapterError: missing or unexpected keys, or shapes that do not fit (names the layer and both
            shapes).
    """
    expected = adapter_state_dict(model, name, bias)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: adapter has {tuple(state[k].shape)}, model expects {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state and tuple(state[k].shape) != tuple(t.shape)
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:6]) + (" ..." if len(mismatched) > 6 else ""))
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors match no adapted module, e.g. {unexpected[:4]}")
    if problems:
        raise IncompatibleAdapterError(
            f"{source} does not fit adapter {name!r} on {type(model).__name__}: "
            + " | ".join(problems)
            + ". Was it trained on a different base model or with different target_modules / r?"
        )
    for k, t in expected.items():
        t.copy_(state[k].to(device=t.device, dtype=t.dtype))


def lora_layers_with(model: nn.Module, name: str) -> list[tuple[str, LoraLayer]]:
    """The LoRA layers that hold adapter ``name``."""
    return [(p, layer) for p, layer in iter_lora_layers(model) if name in layer.r]
