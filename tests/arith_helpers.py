"""Adapters on the tiny Llama for the arithmetic tests (random factors, so every update is non-zero)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import lorakit
from lorakit import LoraConfig

CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj"], use_rslora=True),
    "c": dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


def save_random_adapter(base: nn.Module, path: Path, seed: int = 0, **config) -> Path:
    """Add an adapter with random A and B to a copy of ``base`` and save it to ``path``."""
    model = copy.deepcopy(base)
    lorakit.add_adapter(model, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(model, "default").values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    lorakit.save_adapter(model, path)
    return path


def ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(3))


def logits_with(base: nn.Module, path: Path) -> torch.Tensor:
    """Logits of ``base`` (a copy) with the adapter at ``path`` loaded by lorakit."""
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, path)
    with torch.no_grad():
        return model(ids()).logits
