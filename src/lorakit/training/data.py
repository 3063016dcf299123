"""Training data: JSONL reading, the three row formats, rendering, label masking and truncation.

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

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import DataError
from lorakit.training.formats import RowProblem, RowSpec, normalize

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Row:
    """One parsed JSONL record and where it came from (for error messages)."""

    data: dict[str, Any]
    source: str  # "file.jsonl:LINE"
    format: str  # one of FORMATS


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


def jsonl_files(path: str | Path) -> list[Path]:
    """The JSONL files behind ``path``: the file itself, or every ``*.jsonl`` in a directory (sorted)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix == ".jsonl" and f.is_file())
        if not files:
            raise DataError(f"data directory {str(p)!r} holds no *.jsonl files; expected one or more JSONL files.")
        return files
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist; pass a JSONL file or a directory of them.")
    return [p]


def read_jsonl(path: str | Path, skip_bad_lines: bool = False, spec: RowSpec | None = None) -> list[Row]:
    """Read and validate every row of a JSONL file or directory.

    Args:
        path: A ``.jsonl`` file or a directory of them.
        skip_bad_lines: Skip (and count in one warning) lines that are not JSON or lack the needed keys,
            instead of raising.
        spec: Format and column names to expect (default: detect each row; see `lorakit.training.formats`).

    Returns:
        The rows, in file order.

    Raises:
        DataError: A missing or empty file, a bad line (naming file and line) unless skipped, or no
            usable row at all.
    """
    rows: list[Row] = []
    bad: list[str] = []
    for file in jsonl_files(path):
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{lineno}"
                problem, record, fmt = None, None, None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    problem = f"not valid JSON ({e.msg} at column {e.colno})"
                if problem is None:
                    try:
                        record, fmt = normalize(record, spec or RowSpec())
                    except RowProblem as e:
                        problem = str(e)
                if problem is None:
                    rows.append(Row(record, where, fmt))
                elif skip_bad_lines:
                    bad.append(f"{where}: {problem}")
                else:
                    raise DataError(f"{where}: line {problem}. Fix the line or pass --skip-bad-lines to skip it.")
    if bad:
        logger.warning("skipped %d bad lines (first: %s)", len(bad), bad[0])
    if not rows:
        raise DataError(f"data {str(path)!r} holds no usable rows; expected JSONL with one example per line.")
    return rows


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


def tokenize_rows(
    rows: Sequence[Row], tokenizer: Any, max_length: int, mask_prompt: bool = True, chat_template: bool = True
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize many rows; truncation and label-less examples are counted, never raised."""
    stats = TokenizeStats(total=len(rows))
    out = []
    for row in rows:
        ex, truncated = tokenize(row, tokenizer, max_length, mask_prompt, chat_template)
        stats.truncated += truncated
        if all(label == IGNORE_INDEX for label in ex.labels):
            stats.dropped_no_labels.append(row.source)
            continue
        out.append(ex)
    stats.warn(max_length)
    if not out:
        raise DataError(
            f"none of the {len(rows)} examples has a token to learn within max_length={max_length}; raise --max-length."
        )
    return out, stats


def split_train_eval(rows: Sequence[Row], eval_ratio: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out ``eval_ratio`` of the rows (at least one, never all) with a seeded shuffle."""
    if len(rows) < 2 or eval_ratio <= 0:
        return list(rows), []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_ratio)))
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
