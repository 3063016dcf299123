"""The reference path: transformers' ``generate`` under `lorakit.route`, one prompt at a time.

`lorakit.generate` uses it for models the fast engine does not support; tests and the benchmark compare the
engine against it (greedy fp32 outputs must be equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

import lorakit


@torch.no_grad()
def reference_generate(
    model: nn.Module, ids: Sequence[Sequence[int]], rows: Sequence[str | None], max_new_tokens: int,
    stops: Sequence[int], temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
) -> list[list[int]]:  # fmt: skip
    """Generated token ids per prompt (stop token excluded), each prompt alone with its adapter routed."""
    device = next(model.parameters()).device
    has_lora = bool(lorakit.list_adapters(model))
    out = []
    for prompt, adapter in zip(ids, rows):
        if seed is not None:
            torch.manual_seed(seed)
        inputs = torch.tensor([list(prompt)], device=device)
        kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "eos_token_id": list(stops)}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        ctx = lorakit.route(model, [adapter]) if has_lora else nullcontext()
        with ctx:
            gen = model.generate(
                inputs, attention_mask=torch.ones_like(inputs), pad_token_id=stops[0] if stops else 0, **kwargs
            )
        tokens = gen[0, inputs.shape[1] :].tolist()
        out.append([t for t in tokens if t not in set(stops)])
    return out
