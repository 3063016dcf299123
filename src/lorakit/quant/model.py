"""`quantize`: replace the Linear layers of a model's transformer blocks by frozen 4-bit layers, in place.

Also the tiny interface the rest of lorakit uses for any 4-bit linear (lorakit's `NF4Linear` or bitsandbytes'
``Linear4bit``): `is_quantized`, `dequantized_weight`, `compute_dtype_of`, `quantized_bytes`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.quant.bnb import bnb_dequantized_weight, is_bnb_4bit, to_bnb_linear4bit
from lorakit.quant.nf4_linear import NF4Linear

METHODS = ("nf4",)
BACKENDS = ("torch", "bnb")
_IN_BLOCK = re.compile(r"(^|\.)\d+\.")  # a path through a numbered block: "model.layers.3.mlp.up_proj"


def is_quantized(module: nn.Module) -> bool:
    """True for a frozen 4-bit linear layer: lorakit's `NF4Linear` or bitsandbytes' ``Linear4bit``."""
    return isinstance(module, NF4Linear) or is_bnb_4bit(module)


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh dense ``(out_features, in_features)`` weight of a 4-bit layer (default dtype: its compute dtype)."""
    if isinstance(module, NF4Linear):
        return module.dequantized_weight(dtype)
    if is_bnb_4bit(module):
        return bnb_dequantized_weight(module, dtype or compute_dtype_of(module))
    raise TypeError(f"{type(module).__name__} is not a 4-bit layer (NF4Linear or bitsandbytes Linear4bit)")


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a 4-bit layer computes in (its dequantized weight's dtype)."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is None and is_bnb_4bit(module):
        dtype = module.weight.quant_state.dtype
    return dtype or torch.float32


def quantized_device(module: nn.Module) -> torch.device:
    """The device holding a 4-bit layer's codes."""
    return module.device if isinstance(module, NF4Linear) else module.weight.device


def quantized_bytes(model: nn.Module) -> dict[str, int | float]:
    """Storage of the 4-bit layers in ``model``: ``layers``, ``bytes`` (codes + scales) and ``fp32_bytes``.

    ``ratio`` = bytes / fp32_bytes (QLoRA with double quant: (4 + 8/64 + 32/(64*256)) / 32 ~ 0.129).
    """
    layers = nbytes = dense = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            nbytes += module.nbytes()
        elif is_bnb_4bit(module):
            state = module.weight.quant_state
            parts = [module.weight.data, state.absmax]
            if state.nested:
                parts += [state.state2.absmax, state.offset]
            nbytes += sum(t.numel() * t.element_size() for t in parts)
        else:
            continue
        layers += 1
        dense += 4 * module.in_features * module.out_features
    return {"layers": layers, "bytes": nbytes, "fp32_bytes": dense, "ratio": nbytes / dense if dense else 0.0}


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _selected(model: nn.Module, skip_modules: Sequence[str]) -> tuple[list[str], list[str]]:
    """Linear layers inside numbered blocks (not the output head, not ``skip_modules``); and any LoRA wrappers."""
    head, chosen, wrapped = _output_head(model), [], []
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
            wrapped.append(name)
        if not isinstance(module, nn.Linear) or is_bnb_4bit(module) or module is head:
            continue
        if any(name == s or name.endswith("." + s) for s in skip_modules) or not _IN_BLOCK.search(name):
            continue
        chosen.append(name)
    return chosen, wrapped


def quantize(
    model: nn.Module,
    method: str = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    backend: str = "torch",
    skip_modules: Sequence[str] = (),
) -> nn.Module:
    """Store every ``nn.Linear`` of the model's transformer blocks as frozen NF4, in place (QLoRA's base).

    Call it before `lorakit.add_adapter`; LoRA then trains full-precision adapters on the 4-bit base.
    Embeddings, the output head and Linear layers outside numbered blocks (e.g. a classifier head) stay as
    they are. Use `quantized_bytes` for the storage.

    Args:
        model: The model (e.g. a transformers ``LlamaForCausalLM``); changed in place.
        method: Only "nf4" (4-bit NormalFloat, block size 64).
        double_quant: Quantize the per-block absmax scales too (saves ~0.37 bits per weight).
        compute_dtype: dtype of the dequantized weight and the matmul; default: each layer's weight dtype.
        backend: "torch" (lorakit's `NF4Linear`, no extra dependency) or "bnb" (bitsandbytes ``Linear4bit``).
        skip_modules: Module names or dotted suffixes to keep in full precision.

    Returns:
        ``model``.

    Raises:
        ConfigError: unknown method/backend, adapters already injected, or no Linear layer in numbered blocks.
        ImportError: ``backend="bnb"`` without bitsandbytes installed (the message names what to install).
    """
    if method != "nf4":
        raise ConfigError(f"quantize method {method!r} is not supported; use one of {list(METHODS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"quantize backend {backend!r} is not supported; use one of {list(BACKENDS)}")
    chosen, wrapped = _selected(model, tuple(skip_modules))
    if wrapped:
        raise ConfigError(
            f"quantize the base model before adding adapters: {wrapped[:3]} already wrap a base layer; "
            "call lorakit.quantize(model) first, then lorakit.add_adapter / load_adapter"
        )
    if not chosen and any(is_quantized(m) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} is already quantized (its block Linear layers are 4-bit)")
    if not chosen:
        raise ConfigError(
            f"quantize found no nn.Linear inside numbered transformer blocks of {type(model).__name__} "
            "(e.g. 'model.layers.0.mlp.up_proj'); the output head and embeddings are never quantized"
        )
    replacements = {}
    for name in chosen:  # all built before any is swapped in: an error leaves the model as it was
        linear = model.get_submodule(name)
        if backend == "bnb":
            replacements[name] = to_bnb_linear4bit(linear, double_quant=double_quant, compute_dtype=compute_dtype)
        else:
            new = NF4Linear.from_linear(linear, double_quant=double_quant, compute_dtype=compute_dtype)
            replacements[name] = new.train(linear.training)
    for name, new in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
