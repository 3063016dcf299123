"""Shared by the DoRA tests: factors and magnitudes moved away from their init, and the same done to real PEFT."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn


def perturb(params: Iterable[tuple[str, torch.Tensor]], seed: int = 1, scale: float = 0.2) -> None:
    """Non-zero factors and a magnitude away from its init, so every DoRA term shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in params:
            if "magnitude" in n:
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def peft_dora(base: nn.Module, config: dict, scale: float = 0.2) -> nn.Module:
    """A PEFT DoRA model on a copy of ``base`` (``config``: PEFT LoraConfig fields), perturbed by `perturb`."""
    model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**config)).eval()
    perturb([(n, p) for n, p in model.named_parameters() if "lora_" in n], scale=scale)
    return model
