"""Per-layer LoRA factors (`lorakit.ops.LayerFactors`) from and to PEFT-format adapter folders, or from a model.

Reading is strict: a folder that is missing a factor, whose ranks disagree with its config, or that holds
non-finite values raises `FormatError` naming the layer, before any arithmetic runs on it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.adapters import get_config
from lorakit.config import LoraConfig
from lorakit.errors import FormatError
from lorakit.io.atomic import read_adapter_dir, write_adapter_dir
from lorakit.io.peft_format import CONFIG_NAME, PREFIX, to_peft_state
from lorakit.ops.factors import LayerFactors, module_order
from lorakit.state import adapter_state_dict

# PEFT file key suffix -> (factor, kind); linear and conv share names and differ by A's number of dimensions.
_SUFFIXES = {
    ".lora_A.weight": ("a", "linear"),
    ".lora_B.weight": ("b", "linear"),
    ".lora_embedding_A": ("a", "embedding"),
    ".lora_embedding_B": ("b", "embedding"),
}


@dataclass
class AdapterFactors:
    """An adapter as per-layer factors, its config, and the tensors that are not LoRA factors.

    Attributes:
        config: The adapter's `LoraConfig`.
        layers: ``{module_path: LayerFactors}`` in file order.
        extras: Other tensors of the adapter file under their PEFT keys (``modules_to_save`` copies, trained
            biases); arithmetic does not touch them.
        source: Where it came from (for messages).
    """

    config: LoraConfig
    layers: dict[str, LayerFactors]
    extras: dict[str, Tensor] = field(default_factory=dict)
    source: str = ""


def read_factors(path: str | os.PathLike) -> AdapterFactors:
    """Read a PEFT-format adapter folder into per-layer factors.

    Raises:
        FormatError: missing or corrupt files, an invalid config, a layer with only one factor, a rank that
            differs from the config, non-finite values, or no LoRA tensors at all.
    """
    raw, state = read_adapter_dir(path)
    source = str(path)
    config = LoraConfig.from_dict(raw, source=str(Path(path) / CONFIG_NAME))
    return parse_peft_state(state, config, source)


def factors_of(model: nn.Module, name: str = "default") -> AdapterFactors:
    """The factors of adapter ``name`` loaded on ``model`` (copies, detached), as if saved and read back."""
    config = get_config(model, name)
    state = to_peft_state(adapter_state_dict(model, name, config.bias), name)
    state = {k: t.detach().clone() for k, t in state.items()}
    return parse_peft_state(state, config, f"adapter {name!r} of {type(model).__name__}")


def parse_peft_state(state: dict[str, Tensor], config: LoraConfig, source: str) -> AdapterFactors:
    """Group a PEFT-keyed adapter state dict into per-layer factors (see `read_factors` for the checks)."""
    parts: dict[str, dict[str, tuple[Tensor, str]]] = {}
    extras: dict[str, Tensor] = {}
    for key, tensor in state.items():
        match = next(((s, v) for s, v in _SUFFIXES.items() if key.endswith(s)), None)
        if match is None:
            extras[key] = tensor
            continue
        suffix, (factor, kind) = match
        path = key[: -len(suffix)].removeprefix(PREFIX)
        parts.setdefault(path, {})[factor] = (tensor, kind)
    problems: list[str] = []
    layers: dict[str, LayerFactors] = {}
    for path, got in sorted(parts.items(), key=lambda item: module_order(item[0])):
        layer = _layer(path, got, config, problems)
        if layer is not None:
            layers[path] = layer
    if not layers and not problems:
        problems.append(f"no LoRA factors (lora_A / lora_B tensors) found; keys: {sorted(state)[:4]}")
    if problems:
        shown = "; ".join(problems[:6]) + (f" ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise FormatError(f"adapter {source!r} is corrupt or not a LoRA adapter: {shown}. Re-save or re-download it.")
    return AdapterFactors(config, layers, extras, source)


def _layer(path: str, got: dict[str, tuple[Tensor, str]], config: LoraConfig, problems: list[str]):
    if set(got) != {"a", "b"}:
        missing = "B" if "a" in got else "A"
        problems.append(f"{path}: has lora_{'A' if missing == 'B' else 'B'} but no lora_{missing}")
        return None
    (a, kind), (b, _) = got["a"], got["b"]
    if not (a.is_floating_point() and b.is_floating_point()):
        problems.append(f"{path}: factors must be floating point, got {a.dtype} and {b.dtype}")
        return None
    if kind == "linear" and a.dim() > 2:
        kind = "conv"
    if kind == "conv":
        ok_dims = b.dim() == a.dim() and all(d == 1 for d in b.shape[2:])
    else:
        ok_dims = a.dim() == 2 and b.dim() == 2
    r = a.shape[0]
    if not ok_dims or b.shape[1] != r:
        problems.append(f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form B @ A")
        return None
    expected = config.rank_for(path)
    if r != expected:
        problems.append(f"{path}: rank {r} in the weights but r={expected} in {CONFIG_NAME}")
        return None
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        problems.append(f"{path}: non-finite values (NaN/inf) in the factors")
        return None
    return LayerFactors(
        a=a.reshape(r, -1),  # (r, in) or (r, in_channels * prod(kernel))
        b=b.reshape(b.shape[0], r),  # (out, r)
        scaling=config.scaling_for(path),
        kind=kind,
        a_tail=tuple(a.shape[1:]) if kind == "conv" else (),
        fan_in_fan_out=config.fan_in_fan_out and kind == "linear",
    )


def peft_tensors(layers: dict[str, LayerFactors]) -> dict[str, Tensor]:
    """The PEFT file keys and tensor shapes of per-layer factors (inverse of `parse_peft_state`)."""
    out: dict[str, Tensor] = {}
    for path, f in layers.items():
        if f.kind == "embedding":
            out[f"{PREFIX}{path}.lora_embedding_A"] = f.a
            out[f"{PREFIX}{path}.lora_embedding_B"] = f.b
            continue
        a, b = f.a, f.b
        if f.kind == "conv":
            a = a.reshape(f.rank, *f.a_tail)  # (r, in_channels, *kernel)
            b = b.reshape(f.out_features, f.rank, *([1] * (len(f.a_tail) - 1)))  # (out, r, 1, ...)
        out[f"{PREFIX}{path}.lora_A.weight"] = a
        out[f"{PREFIX}{path}.lora_B.weight"] = b
    return out


def write_factors(path: str | os.PathLike, adapter: AdapterFactors) -> None:
    """Write ``adapter`` as a PEFT-format folder (``adapter_config.json`` + safetensors, each atomically).

    The config must describe the factors (ranks and scalings per layer); `lorakit.arith` builds it.
    """
    tensors = {**peft_tensors(adapter.layers), **adapter.extras}
    config = dataclasses.replace(adapter.config, inference_mode=True)
    write_adapter_dir(path, config.to_dict(), tensors)
