"""The scheduler's forward passes: a left-padded prefill and one decode step, and the open per-row route.

The route stays open across the decode steps of an unchanged batch, so its stacked factors are built once.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext

import torch

import lorakit
from lorakit.serve.kvcache import BatchCache


class Forward:
    """Runs ``model`` for the scheduler (no grad is the caller's business).

    Args:
        model: A causal LM (transformers), possibly with lorakit adapters.
        routed: Apply each row's adapter with `lorakit.route` (False in merged mode: plain forwards).
    """

    def __init__(self, model, routed: bool) -> None:
        self.model, self.routed = model, routed
        # transformers >= 5.2x names the cache argument `cache` (and warns about `past_key_values`)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._route: AbstractContextManager | None = None
        self._route_rows: tuple | None = None

    def prefill(self, prompts: list[list[int]], adapters: tuple) -> tuple[BatchCache, torch.Tensor]:
        """One left-padded pass over ``prompts``; their cache and next-token logits ``(rows, vocab)``."""
        from transformers import DynamicCache

        device, width = self.model.device, max(len(p) for p in prompts)
        pad = [width - len(p) for p in prompts]
        ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)], device=device)  # (rows, width)
        mask = (torch.arange(width, device=device)[None, :] >= torch.tensor(pad, device=device)[:, None]).long()
        cache = DynamicCache(config=self.model.config)
        with self.routing(adapters):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # (rows, width): each row counts from 0
                **{self._cache_kw: cache},
                use_cache=True,
                logits_to_keep=1,
            )
        joined = BatchCache()
        joined.add(cache, pad)
        return joined, out.logits[:, -1]

    def decode(self, last: list[int], pos: list[int], cache: BatchCache) -> torch.Tensor:
        """One step: token ``last[i]`` at position ``pos[i]`` per row over ``cache``; logits ``(rows, vocab)``."""
        device = self.model.device
        out = self.model(
            input_ids=torch.tensor([[t] for t in last], device=device),  # (batch, 1)
            attention_mask=cache.step_mask(device),  # (batch, length + 1)
            position_ids=torch.tensor([[p] for p in pos], device=device),  # (batch, 1)
            **{self._cache_kw: cache.cache},
            cache_position=torch.tensor([cache.length], device=device),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    # ---- routes -------------------------------------------------------------------------------------------
    def routing(self, rows: tuple) -> AbstractContextManager:
        """A route applying adapter ``rows[i]`` to row i (a no-op context when not routed)."""
        return lorakit.route(self.model, rows) if self.routed else nullcontext()

    def open_route(self, rows: tuple) -> None:
        """Keep a route for ``rows`` open across steps (its stacked factors are cached while rows are unchanged)."""
        if rows == self._route_rows:
            return
        self.close_route()
        route = self.routing(rows)
        route.__enter__()
        self._route, self._route_rows = route, rows

    def close_route(self) -> None:
        route, self._route, self._route_rows = self._route, None, None
        if route is not None:
            route.__exit__(None, None, None)
