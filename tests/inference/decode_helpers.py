"""Helpers of the fast-decode tests: three random adapters (mixed ranks/targets) and random prompts."""

from __future__ import annotations

import torch

import lorakit
from lorakit import LoraConfig

ADAPTERS = {
    "qv": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "all": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "mlp": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj", "up_proj"], init_lora_weights=False),
}


def with_adapters(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with the three `ADAPTERS`, factors drawn from N(0, 0.3^2) (clearly not no-ops)."""
    gen = torch.Generator().manual_seed(seed)
    for name, config in ADAPTERS.items():
        lorakit.add_adapter(model, config, name=name)
        with torch.no_grad():
            for t in lorakit.adapter_state_dict(model, name).values():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    return model


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    """``n`` random prompts of token ids, lengths 1..12."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (n,), generator=gen).tolist()
    return [torch.randint(0, 128, (k,), generator=gen).tolist() for k in lengths]
