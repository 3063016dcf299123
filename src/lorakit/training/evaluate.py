"""Evaluation: eval loss, and greedy generation scored by exact and normalized match.

Generation is batched with left padding (so every row's next token sits in the last column) and uses the
model's KV cache through ``generate``; it stops at EOS and at the chat template's end-of-turn token.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.training import distributed as dist
from lorakit.training.collate import collate, count_label_tokens
from lorakit.training.data import Example, Row, display_prompt, prompt_text
from lorakit.training.distributed import Dist
from lorakit.training.loss import causal_lm_loss
from lorakit.training.token_store import lengths_of

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@dataclass
class GenerationResult:
    """Scores of one model over one eval set, and the texts behind them."""

    exact_match: float
    normalized_match: float
    n: int
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"exact_match": self.exact_match, "normalized_match": self.normalized_match, "n": self.n}


def normalize(text: str) -> str:
    """Canonical form for the normalized match.

    JSON values compare as parsed objects (key order and spacing do not matter); other text is lower-cased
    with punctuation dropped and whitespace collapsed.
    """
    t = text.strip()
    if t.startswith("```"):  # a fenced block: keep its body
        t = t.strip("`").removeprefix("json").strip()
    try:
        return json.dumps(json.loads(t), sort_keys=True)
    except (json.JSONDecodeError, ValueError):
        return " ".join(_PUNCT.sub(" ", t.lower()).split())


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the chat end-of-turn tokens the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if tok in vocab:
            ids.add(vocab[tok])
    return sorted(ids)


def _batches(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    synced: bool = False,
    weights: str = "fp32",
) -> list[str]:
    """Greedy completions of ``prompts`` (rendered text, templates already applied), in order.

    In fp32 on models it supports, the fast decode engine generates (`lorakit.inference`; same greedy tokens),
    with base ``weights`` in that format. Otherwise prompts are sorted by length before batching so rows of a
    batch need little padding. ``synced`` keeps stepping until every process is done (FSDP: each forward is a
    collective).
    """
    stops = stop_token_ids(tokenizer)
    from lorakit.inference.generate import fast_path_reason

    if weights != "fp32" or (autocast is nullcontext and not synced and fast_path_reason(model) is None):
        from lorakit.inference import generate as fast_generate

        texts = fast_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                              batch_size=batch_size, weights=weights)  # fmt: skip
        return [t.strip() for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(order, batch_size):
            n = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), n), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding
                ids[row, n - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, n - len(encoded[i]) :] = 1
            with autocast():
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=pad_id,
                    use_cache=True,
                    synced_gpus=synced,
                )
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, n:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out


def generation_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Row],
    chat_template: bool = True,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    d: Dist | None = None,
    weights: str = "fp32",
) -> GenerationResult:
    """Generate for every prompt/completion (or conversation) row and score against its reference.

    Args:
        model: The causal LM (with whatever adapter is active).
        tokenizer: Its tokenizer.
        rows: Rows with a completion (prompt/completion, or messages ending with an assistant turn).
        chat_template: Render prompt/completion rows with the chat template (as in training).
        max_new_tokens: Default: the longest reference in tokens plus 16.
        batch_size: Prompts per ``generate`` call.
        autocast: Mixed-precision context factory.
        d: In a multi-process run each process generates for its share of the rows; every process gets the
            scores of all of them.
        weights: Base weight format of the fast decode engine (`lorakit.inference.weights.WEIGHT_FORMATS`).

    Raises:
        DataError: A row without a completion to compare against.
    """
    pairs = [prompt_text(r, tokenizer, chat_template) for r in rows]
    prompts, refs = [p for p, _ in pairs], [c for _, c in pairs]
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in refs) + 16
    if d is not None and d.enabled:
        mine, real = dist.padded_shard(prompts, d)
        local = generate(model, tokenizer, mine, max_new_tokens, batch_size, autocast, synced=d.fsdp)[:real]
        preds = [p for part in dist.gather_objects(d, local, "gathering eval generations") for p in part]
    else:
        preds = generate(model, tokenizer, prompts, max_new_tokens, batch_size, autocast, weights=weights)
    em = sum(exact_match(p, r) for p, r in zip(preds, refs)) / len(refs)
    nm = sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(refs)
    return GenerationResult(em, nm, len(refs), preds, refs, prompts)


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 16,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    d: Dist | None = None,
) -> float:
    """Mean cross-entropy per learned token over ``examples`` (in a multi-process run: over every process's share).

    Every process runs the same number of batches (shares are padded with label-free rows) so FSDP's per-forward
    collectives stay in step.
    """
    d = d or Dist()
    lengths = lengths_of(examples)
    mine, real = dist.padded_shard(range(len(examples)), d) if d.enabled else (range(len(examples)), len(examples))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(mine)), key=lambda k: lengths[mine[k]])
        for positions in _batches(order, batch_size):  # padded-share rows (k >= real) carry no labels
            rows = [examples[mine[k]] if k < real else examples[mine[k]].without_labels() for k in positions]
            batch = {name: t.to(device) for name, t in collate(rows, pad_id).items()}
            with autocast():
                loss_sum = causal_lm_loss(model, batch, reduction="sum", split_head=not d.fsdp)
            total += float(loss_sum)
            count += count_label_tokens(batch)
    finally:
        model.train(was_training)
    total, count = dist.all_sum(d, [total, count], "gathering the eval loss")
    return total / max(count, 1)


def format_table(columns: dict[str, dict[str, float | None]]) -> str:
    """A plain-text table: one column per model ("base", "adapter"), one row per metric."""
    metrics = ["exact_match", "normalized_match", "eval_loss"]
    head = f"{'metric':<18}" + "".join(f"{name:>12}" for name in columns)
    lines = [head, "-" * len(head)]
    for m in metrics:
        if all(col.get(m) is None for col in columns.values()):
            continue
        cells = []
        for col in columns.values():
            v = col.get(m)
            cells.append(f"{'-':>12}" if v is None else (f"{v:>11.1%} " if "match" in m else f"{v:>12.4f}"))
        lines.append(f"{m:<18}" + "".join(cells))
    return "\n".join(lines)


def run_eval(
    data: str,
    model: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    chat_template: bool = True,
    precision: str = "auto",
    limit: int | None = None,
    skip_bad_lines: bool = False,
    model_options: dict[str, Any] | None = None,
    max_length: int = 1024,
    weights: str = "fp32",
) -> dict[str, Any]:
    """``lorakit eval``: score the base model and, with ``adapter``, the adapter on the same rows.

    Returns:
        ``{"data", "n", "base": {...}, "adapter": {...}?, "samples": [...]}`` where each model's entry holds
        exact_match, normalized_match and eval_loss.

    Raises:
        DataError: The file is missing/empty/malformed, or has rows without a completion to compare against.
    """
    from lorakit.errors import DataError
    from lorakit.models import default_model_name, load_model
    from lorakit.training.precision import make_autocast
    from lorakit.training.sources import read_rows
    from lorakit.training.token_store import tokenize_rows

    rows = list(read_rows(data, skip_bad_lines=skip_bad_lines))
    no_completion = [r.source for r in rows if r.format == "text"]
    if no_completion:
        raise DataError(
            f"eval data {data!r}: {len(no_completion)} of {len(rows)} rows have no completion to compare against "
            f"(first: {no_completion[0]}, a 'text' row); use prompt/completion or messages rows."
        )
    rows = rows[:limit] if limit else rows
    m, tok = load_model(model or default_model_name(), **(model_options or {}))
    autocast = make_autocast(precision, next(m.parameters()).device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples, _ = tokenize_rows(rows, tok, max_length, True, chat_template)

    def score() -> tuple[dict[str, Any], GenerationResult]:
        g = generation_eval(m, tok, rows, chat_template, max_new_tokens, batch_size, autocast, weights=weights)
        return {**g.summary(), "eval_loss": eval_loss(m, examples, pad_id, batch_size, autocast)}, g

    out: dict[str, Any] = {"data": str(data), "n": len(rows)}
    out["base"], g = score()
    if adapter:
        from lorakit import load_adapter

        load_adapter(m, adapter)
        out["adapter"], g = score()
    out["samples"] = [
        {"prompt": display_prompt(row), "reference": r, "prediction": x}
        for row, r, x in list(zip(rows, g.references, g.predictions))[:3]
    ]
    return out
