"""LoRA wrappers per module type, and the dispatch from a base module to its wrapper."""

from __future__ import annotations

from torch import nn

from lorakit.layers.base import LoraLayer, iter_lora_layers
from lorakit.layers.conv import LoraConv
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear, is_hf_conv1d
from lorakit.layers.quant_linear import LoraQuantLinear
from lorakit.layers.saved import ModulesToSave
from lorakit.quant import is_quantized

__all__ = [
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraQuantLinear",
    "ModulesToSave",
    "is_hf_conv1d",
    "iter_lora_layers",
    "supports_lora",
    "wrap",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def supports_lora(module: nn.Module) -> bool:
    """True when lorakit has a LoRA wrapper for this module (isinstance dispatch: subclasses count)."""
    return isinstance(module, (nn.Linear, nn.Embedding, *_CONVS)) or is_hf_conv1d(module) or is_quantized(module)


def is_linear(module: nn.Module) -> bool:
    """True for modules that ``target_modules="all-linear"`` selects."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module) or is_quantized(module)


def wrap(module: nn.Module, fan_in_fan_out: bool = False) -> LoraLayer:
    """A new, empty LoRA wrapper around ``module`` (which stays untouched at ``.base_layer``)."""
    if is_quantized(module):  # before nn.Linear: bitsandbytes' Linear4bit subclasses it
        return LoraQuantLinear(module)
    if is_hf_conv1d(module):
        return LoraLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        return LoraLinear(module, fan_in_fan_out=fan_in_fan_out)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, _CONVS):
        return LoraConv(module)
    raise TypeError(f"no LoRA layer for {type(module).__name__}")
