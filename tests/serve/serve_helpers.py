"""Serving test helpers: a real uvicorn server on a free loopback port, and solo greedy reference answers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import lorakit


@contextmanager
def running_server(model_dir: Path, adapters: Path | None = None, **kwargs) -> Iterator[tuple[str, object]]:
    """Start `lorakit serve` on a free 127.0.0.1 port in a thread; yields ``(base_url, state)``; always stops."""
    from lorakit.serve.server import build_state, serve_in_thread

    model, tokenizer = lorakit.load_model(model_dir)
    state = build_state(model, tokenizer, base_name="tiny", adapters_dir=adapters, **kwargs)
    with serve_in_thread(state) as url:
        yield url, state


def solo_greedy(model_dir: Path, adapters: Path, requests: list[tuple[str | None, list[int], int]]) -> list[str]:
    """Reference answers: each request run alone with `generate` (greedy) and its adapter routed, one model."""
    model, tokenizer = lorakit.load_model(model_dir)
    for name in sorted({a for a, _, _ in requests if a is not None}):
        lorakit.load_adapter(model, adapters / name, name=name)
    out = []
    for adapter, ids, max_tokens in requests:
        x = torch.tensor([ids])
        with torch.no_grad(), lorakit.route(model, [adapter]):
            y = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        out.append(tokenizer.decode(y[0, len(ids) :], skip_special_tokens=True))
    return out


def slow_down(target, seconds: float) -> None:
    """Make every forward pass take at least ``seconds`` longer (for tests that race generation).

    ``target`` is a model (its ``forward``) or a server state (every prefill and decode step of its scheduler, on
    the fast engine and on the reference path alike).
    """
    batcher = getattr(target, "batcher", None)
    if batcher is None:
        target.forward = _slowed(target.forward, seconds)
        return
    for step in (batcher.reference, batcher.engine):
        if step is not None:
            step.prefill, step.decode = _slowed(step.prefill, seconds), _slowed(step.decode, seconds)


def _slowed(fn, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow
