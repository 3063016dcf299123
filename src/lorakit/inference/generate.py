"""`lorakit.generate`: completions of many prompts, each with its own adapter, through the fast decode engine.

Rows join the running batch as others finish (continuous batching), so a long answer does not hold back the
rest. Models the engine does not support fall back to ``model.generate`` under `lorakit.route` (same results, the
old speed); so do sampled rows' generators on the CPU, which keeps seeded runs reproducible on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adapters import RESERVED_NAMES, list_adapters
from lorakit.errors import AdapterNotFoundError, ConfigError
from lorakit.inference import llama
from lorakit.inference.engine import DecodeEngine
from lorakit.layers.base import iter_lora_layers


def default_rows(model: nn.Module, n: int) -> list[str | None]:
    """What ``adapters=None`` means: the model's one active unmerged adapter on every row (None: adapters off)."""
    layers = [layer for _, layer in iter_lora_layers(model)]
    if not layers or any(layer.disable_adapters for layer in layers):
        return [None] * n
    active = list(dict.fromkeys(a for lay in layers for a in lay.active_adapters if a not in lay.merged_adapters))
    if len(active) > 1:
        raise ConfigError(f"{len(active)} adapters are active ({active}); pass adapters= (one name per prompt)")
    return [active[0] if active else None] * n


def fast_path_reason(model: nn.Module) -> str | None:
    """Why `generate` with ``adapters=None`` would not take the fast engine on ``model`` (None: it would)."""
    reason = llama.unsupported_reason(model)
    if reason is None:
        try:
            default_rows(model, 1)
        except ConfigError as exc:
            reason = str(exc)
    return reason


def _rows(model: nn.Module, adapters: str | Sequence[str | None] | None, n: int) -> list[str | None]:
    if adapters is None:
        return default_rows(model, n)
    rows = [adapters] * n if isinstance(adapters, str) else list(adapters)
    if len(rows) != n:
        raise ConfigError(f"adapters has {len(rows)} names for {n} prompts; give one per prompt (None: the base)")
    rows = [None if r in (None, *RESERVED_NAMES) else r for r in rows]
    missing = sorted({r for r in rows if r is not None} - set(list_adapters(model)))
    if missing:
        raise AdapterNotFoundError(f"adapters {missing} are not loaded; loaded: {list_adapters(model)}")
    return rows


def _pick(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> Tensor:
    """Next token per row ``(rows,)``: argmax on the device, or a sample (softmax with top-p) from ``gen``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (rows, vocab)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        sorted_p[torch.cumsum(sorted_p, dim=-1) - sorted_p >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    adapters: str | Sequence[str | None] | None = None,
    *,
    max_new_tokens: int = 64,
    stop_token_ids: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
    weights: str = "fp32",
    engine: DecodeEngine | None = None,
) -> list[str]:
    """Completions of ``prompts`` (rendered text, or token ids), in order; special tokens are not decoded.

    Args:
        model: A causal LM with lorakit adapters (any number, left unmerged).
        tokenizer: Its tokenizer.
        prompts: Texts (encoded without added special tokens) or lists of token ids.
        adapters: One adapter name for every prompt, one name (or None: the base model) per prompt, or None for
            the model's active adapter.
        max_new_tokens: Most tokens generated per prompt.
        stop_token_ids: Tokens that end a completion; default: the tokenizer's EOS and chat end-of-turn tokens.
        temperature: 0 is greedy; otherwise logits are divided by it and sampled.
        top_p: Nucleus sampling mass (1: off).
        seed: Seed of the one CPU generator all sampled rows draw from (None: 0).
        batch_size: Most prompts decoding together.
        weights: Base weight format for the fast path (`lorakit.inference.weights.WEIGHT_FORMATS`).
        engine: A `DecodeEngine` to reuse (its weight format wins over ``weights``).

    Raises:
        ConfigError: Bad arguments, or a weight format other than fp32 on a model the fast path cannot run.
    """
    from lorakit.training.evaluate import stop_token_ids as default_stops

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    rows = _rows(model, adapters, len(ids))
    stops = set(default_stops(tokenizer) if stop_token_ids is None else stop_token_ids)
    if not ids:
        return []
    reason = llama.unsupported_reason(model) if engine is None else None
    if reason is not None:
        if weights != "fp32":
            raise ConfigError(f"weights={weights!r} needs the fast decode path, which cannot run this model: {reason}")
        from lorakit.inference.reference import reference_generate

        out = reference_generate(model, ids, rows, max_new_tokens, sorted(stops), temperature, top_p, seed)
    else:
        if engine is None:
            longest = max(len(p) for p in ids) + max_new_tokens + 1
            engine = DecodeEngine(model, weights=weights, max_batch=min(batch_size, len(ids)), max_len=longest)
        out = run_engine(engine, ids, rows, max_new_tokens, stops, temperature, top_p, seed)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in out]


def run_engine(
    engine: DecodeEngine, ids: list[list[int]], rows: list[str | None], max_new_tokens: int, stops: set[int],
    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
) -> list[list[int]]:  # fmt: skip
    """Generated token ids per prompt (stop token excluded), rows admitted as slots free up."""
    gen = None if temperature <= 0 else torch.Generator().manual_seed(seed if seed is not None else 0)
    out: list[list[int]] = [[] for _ in ids]
    pending = list(range(len(ids)))
    running: list[int] = []
    engine.reset()
    logits = None
    while pending or running:
        free = engine.max_batch - len(running)
        if pending and free > 0:
            new, pending = pending[:free], pending[free:]
            fresh = engine.prefill([ids[i] for i in new], [rows[i] for i in new])
            logits = fresh if logits is None else torch.cat([logits, fresh])
            running += new
        tokens = _pick(logits, temperature, top_p, gen)  # (rows,)
        keep = []
        for j, (i, t) in enumerate(zip(running, tokens.tolist())):
            if t not in stops:
                out[i].append(t)
            limit = len(ids[i]) + len(out[i]) + 1 >= engine.max_len
            if not (t in stops or len(out[i]) >= max_new_tokens or limit):
                keep.append(j)
        if len(keep) < len(running):
            engine.keep(keep)
            running, tokens = [running[j] for j in keep], tokens[keep]
        logits = engine.decode(tokens) if running else None
    engine.reset()
    return out
