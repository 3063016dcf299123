"""Fixtures for the layer tests: wrap a single module and give it one adapter, the way injection does."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lorakit.layers import LoraLayer, wrap


def _add_lora(
    module: nn.Module,
    name: str = "default",
    r: int = 4,
    alpha: float = 8.0,
    dropout: float = 0.0,
    init: bool | str = False,
    use_rslora: bool = False,
) -> LoraLayer:
    """Wrap ``module`` (if needed) and add one active adapter; ``init=False`` gives random A and B."""
    layer = module if isinstance(module, LoraLayer) else wrap(module)
    layer.update_layer(name, r=r, lora_alpha=alpha, lora_dropout=dropout, init=init, use_rslora=use_rslora)
    layer.set_active([*layer.active_adapters, name])
    return layer


@pytest.fixture
def add_lora() -> Callable[..., LoraLayer]:
    """``add_lora(module, name=..., r=..., alpha=..., dropout=..., init=...)`` -> the LoRA layer (seeded)."""
    torch.manual_seed(0)
    return _add_lora
