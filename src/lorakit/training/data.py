"""Training data: rows, the three row formats, rendering, label masking and truncation.

Rows are read by `lorakit.training.jsonl` (JSONL files) and `lorakit.training.sources` (everything else); both
return `LazyRows`, which keep only row positions in memory and read a row when it is used. Tokenized examples go
to disk (`lorakit.training.token_store`).

Formats (one per row, detected by keys):

* ``{"text": ...}``: language modeling, loss on every token.
* ``{"prompt": ..., "completion": ...}``: loss on the completion only (unless ``mask_prompt=False``). With a
  tokenizer that has a chat template the pair is rendered as one user turn and one assistant turn, which is
  how an instruct model is prompted at inference (``chat_template=False`` concatenates the raw strings).
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template; loss
  on the assistant turns only.

Masking works on characters, not tokens: rendering yields the text plus the character spans to learn, and
the fast tokenizer's offsets say which tokens fall inside them. That is exact even where a template merges
text across turn boundaries.
"""

from __future__ import annotations

import copy
import logging
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    """One parsed JSONL record and where it came from (for error messages)."""

    data: dict[str, Any]
    source: str  # "file.jsonl:LINE"
    format: str  # one of FORMATS


class LazyRows(Sequence[Row]):
    """Rows read from their source on each access; only ``indices`` (8 bytes per row) stay in memory.

    Subclasses implement `load` (the row at a position of the source). Slices and `subset` share the source.
    """

    def __init__(self, indices: array) -> None:
        self.indices = indices

    def load(self, j: int) -> Row:
        """The row at position ``j`` of the source."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        return self.load(self.indices[i])

    def __iter__(self) -> Iterator[Row]:
        return (self.load(j) for j in self.indices)

    def subset(self, positions: Sequence[int]) -> LazyRows:
        """The rows at ``positions`` (indices into this sequence), reading the same source."""
        out = copy.copy(self)
        out.indices = array("q", (self.indices[p] for p in positions))
        return out


@dataclass
class Example:
    """A tokenized example: ``labels`` is ``IGNORE_INDEX`` wherever no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    def without_labels(self) -> Example:
        """The same tokens with no loss anywhere: a filler row that keeps processes' forwards in step."""
        return Example(self.input_ids, [IGNORE_INDEX] * len(self), self.source)


@dataclass
class TokenizeStats:
    """What tokenization had to change; reported as one warning, never an exception."""

    total: int = 0
    truncated: int = 0
    dropped_no_labels: list[str] = field(default_factory=list)

    def warn(self, max_length: int) -> None:
        if self.truncated:
            logger.warning(
                "%d of %d examples were longer than max_length=%d tokens and were truncated; "
                "raise --max-length to keep them whole.",
                self.truncated,
                self.total,
                max_length,
            )
        if self.dropped_no_labels:
            logger.warning(
                "%d examples had no tokens to learn after truncation and were skipped (first: %s); "
                "raise --max-length or shorten the prompts.",
                len(self.dropped_no_labels),
                self.dropped_no_labels[0],
            )


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render(row: Row, tokenizer: Any, chat_template: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Render a row to text and the character spans that carry loss.

    Returns:
        ``(text, spans)``; for ``text`` rows the span is the whole text.

    Raises:
        DataError: A chat template that does not render turns as a prefix of the longer conversation.
    """
    d = row.data
    if row.format == "text":
        return d["text"], [(0, len(d["text"]))]
    if row.format == "prompt_completion" and not (chat_template and has_chat_template(tokenizer)):
        return d["prompt"] + d["completion"], [(len(d["prompt"]), len(d["prompt"]) + len(d["completion"]))]
    if row.format == "prompt_completion":
        msgs = [{"role": "user", "content": d["prompt"]}, {"role": "assistant", "content": d["completion"]}]
    else:
        msgs = d["messages"]
    if not has_chat_template(tokenizer):
        raise DataError(f"{row.source}: 'messages' rows need a tokenizer with a chat template; this one has none.")
    text = _render_chat(tokenizer, msgs, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_render_chat(tokenizer, msgs[:i], add_generation_prompt=True)) if i else 0
        end = len(_render_chat(tokenizer, msgs[: i + 1], add_generation_prompt=False))
        if not text.startswith(_render_chat(tokenizer, msgs[: i + 1], add_generation_prompt=False)):
            raise DataError(f"{row.source}: the chat template does not render turns as prefixes; cannot mask labels.")
        spans.append((start, end))
    return text, spans


def prompt_text(row: Row, tokenizer: Any, chat_template: bool = True) -> tuple[str, str]:
    """The generation prompt and the reference answer of a row, for greedy-generation eval.

    Raises:
        DataError: A ``text`` row (nothing to compare against) or a conversation not ending in an assistant turn.
    """
    d = row.data
    if row.format == "text":
        raise DataError(
            f"{row.source}: a 'text' row has no completion to compare against; generation eval needs "
            "'prompt'+'completion' or 'messages' rows ending with an assistant turn."
        )
    if row.format == "prompt_completion":
        if not (chat_template and has_chat_template(tokenizer)):
            return d["prompt"], d["completion"]
        msgs = [{"role": "user", "content": d["prompt"]}]
        return _render_chat(tokenizer, msgs, add_generation_prompt=True), d["completion"]
    msgs = d["messages"]
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{row.source}: conversation does not end with an assistant turn to compare against.")
    return _render_chat(tokenizer, msgs[:-1], add_generation_prompt=True), msgs[-1]["content"]


def display_prompt(row: Row) -> str:
    """The user's own prompt text of a row (without template markup), for printing samples."""
    if row.format == "prompt_completion":
        return row.data["prompt"]
    if row.format == "messages":
        users = [m["content"] for m in row.data["messages"] if m["role"] == "user"]
        return users[-1] if users else ""
    return row.data["text"]


def tokenize(
    row: Row, tokenizer: Any, max_length: int, mask_prompt: bool = True, chat_template: bool = True
) -> tuple[Example, bool]:
    """Tokenize a row with its loss mask; returns ``(example, was_truncated)``.

    ``text`` and non-template rows get the tokenizer's EOS appended so the model learns to stop; chat
    templates end turns with their own end token.
    """
    text, spans = render(row, tokenizer, chat_template)
    templated = row.format == "messages" or (
        row.format == "prompt_completion" and chat_template and has_chat_template(tokenizer)
    )
    enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if not templated and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        offsets.append((spans[-1][1] - 1, spans[-1][1]))  # the EOS belongs to the last learned span
    labels = []
    for tok_id, (s, e) in zip(ids, offsets):
        inside = any(a <= s < b or (s == e and a < e <= b) for a, b in spans)
        labels.append(tok_id if inside or not mask_prompt else IGNORE_INDEX)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], row.source), truncated


def split_train_eval(rows: Sequence[Row], eval_ratio: float, seed: int) -> tuple[Sequence[Row], Sequence[Row]]:
    """Hold out ``eval_ratio`` of the rows (at least one, never all) with a seeded shuffle.

    `LazyRows` stay lazy (both parts read the same source); a list gives two lists.
    """
    if len(rows) < 2 or eval_ratio <= 0:
        return rows, rows[:0]
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_ratio)))
    held = sorted(idx[:n_eval])
    held_set = set(held)
    keep = [i for i in range(len(rows)) if i not in held_set]
    if isinstance(rows, LazyRows):
        return rows.subset(keep), rows.subset(held)
    return [rows[i] for i in keep], [rows[i] for i in held]
