"""Community row formats and column mapping, normalized to the three formats the trainer renders.

Every record, whatever its source, becomes one of ``text``, ``prompt_completion`` or ``messages`` (see
`lorakit.training.data`). On top of those:

* **Alpaca**: ``{"instruction", "input" (optional), "output"}``; the prompt is the instruction, followed by the
  input after a blank line when there is one; the completion is the output.
* **ShareGPT**: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``; ``from`` maps to a
  chat role (``human``/``user`` -> user, ``gpt``/``assistant``/``chatgpt``/``bing``/``bard``/``model`` ->
  assistant, ``system`` -> system) and a top-level ``"system"`` string becomes a leading system turn.
* **Column mapping**: ``text_column``, ``prompt_column``/``completion_column`` or ``messages_column`` name the
  columns that hold those fields when they are called something else.

``format="auto"`` detects per row, in this order: messages, ShareGPT, Alpaca, prompt/completion, text. Naming a
format (``--format alpaca``) makes every row that does not fit it an error instead of a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FORMATS = ("text", "prompt_completion", "messages")  # what the trainer renders
FORMAT_CHOICES = ("auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
}  # fmt: skip


def detect_format(record: Any) -> str | None:
    """The format of one record, or None when it has none of the known key sets."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def row_problem(record: dict[str, Any], fmt: str) -> str | None:
    """What is wrong with the values of a record whose keys matched ``fmt`` (None when fine)."""
    if fmt == "text":
        ok = isinstance(record["text"], str) and record["text"].strip()
        return None if ok else "'text' must be a non-empty string"
    if fmt == "prompt_completion":
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            return "'prompt' and 'completion' must be strings"
        return None if record["completion"].strip() else "'completion' is empty"
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return "every message needs string 'role' and 'content'"
    if not any(m["role"] == "assistant" for m in msgs):
        return "'messages' has no assistant turn to learn"
    return None


class RowProblem(ValueError):
    """One record does not fit the expected format; the message says how (the caller adds file and row)."""


@dataclass(frozen=True)
class RowSpec:
    """How records map onto the trainer's formats.

    Args:
        format: One of `FORMAT_CHOICES`; ``auto`` detects per row.
        text_column / prompt_column / completion_column / messages_column: Column names to read instead of
            ``text`` / ``prompt`` / ``completion`` / ``messages``.
    """

    format: str = "auto"
    text_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    messages_column: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMAT_CHOICES:
            raise ValueError(f"format={self.format!r}: expected one of {', '.join(FORMAT_CHOICES)}")

    @property
    def mapped(self) -> dict[str, str]:
        """Canonical key -> column name, for the columns given."""
        pairs = {"text": self.text_column, "prompt": self.prompt_column, "completion": self.completion_column,
                 "messages": self.messages_column}  # fmt: skip
        return {k: v for k, v in pairs.items() if v}


def _expected(spec: RowSpec) -> str:
    if spec.format == "alpaca":
        return "'instruction' and 'output' (Alpaca; 'input' optional)"
    if spec.format == "sharegpt":
        return "'conversations' with 'from'/'value' turns (ShareGPT)"
    names = {"text": "text", "prompt": "prompt", "completion": "completion", "messages": "messages", **spec.mapped}
    by_format = {"text": f"'{names['text']}'", "prompt_completion": f"'{names['prompt']}'+'{names['completion']}'",
                 "messages": f"'{names['messages']}'"}  # fmt: skip
    if spec.format in by_format:
        return by_format[spec.format]
    return (f"{by_format['text']}, {by_format['prompt_completion']}, {by_format['messages']}, "
            "Alpaca 'instruction'+'output' or ShareGPT 'conversations'")  # fmt: skip


def _alpaca(record: dict[str, Any]) -> dict[str, Any]:
    instruction, extra, output = record["instruction"], record.get("input") or "", record["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise RowProblem("Alpaca 'instruction', 'input' and 'output' must be strings")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"prompt": prompt, "completion": output}


def _sharegpt(record: dict[str, Any]) -> dict[str, Any]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise RowProblem("ShareGPT 'conversations' must be a non-empty list")
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or "value" not in turn:
            raise RowProblem(f"ShareGPT turn {i} needs 'from' and 'value' (got {turn!r:.80})")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise RowProblem(f"ShareGPT turn {i} has from={turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        if not isinstance(turn["value"], str):
            raise RowProblem(f"ShareGPT turn {i} 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


def _rename(record: dict[str, Any], spec: RowSpec) -> dict[str, Any]:
    """The record with mapped columns under their canonical names (mapped columns win over same-named ones)."""
    mapped = spec.mapped
    if not mapped:
        return record
    out = {k: v for k, v in record.items() if k not in ("text", "prompt", "completion", "messages")}
    missing = [col for col in mapped.values() if col not in record]
    if missing and spec.format != "auto":
        raise RowProblem(f"has no column {missing[0]!r}")
    out.update({key: record[col] for key, col in mapped.items() if col in record})
    return out


def _detect(record: dict[str, Any], spec: RowSpec) -> str | None:
    if spec.format != "auto":
        return spec.format
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return detect_format(record)


_NEEDS = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "text": ("text",),
          "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}  # fmt: skip


def normalize(record: Any, spec: RowSpec = RowSpec()) -> tuple[dict[str, Any], str]:
    """Map one record onto the trainer's formats.

    Args:
        record: One row (a dict of column -> value).
        spec: The format to expect (or ``auto``) and column names.

    Returns:
        ``(data, format)`` with ``format`` one of ``text``, ``prompt_completion``, ``messages`` and ``data``
        holding that format's keys (plus the record's other columns).

    Raises:
        RowProblem: The record fits no format, or its values are wrong for the one it fits; the message names
            the keys found and the keys expected.
    """
    if not isinstance(record, dict):
        raise RowProblem(f"is a {type(record).__name__}, not an object; expected keys {_expected(spec)}")
    renamed = _rename(record, spec)
    fmt = _detect(renamed, spec)
    if fmt is None or any(renamed.get(k) is None for k in _NEEDS[fmt]):
        raise RowProblem(f"has keys {sorted(record)}; expected {_expected(spec)}")
    if fmt == "alpaca":
        renamed, fmt = {**renamed, **_alpaca(renamed)}, "prompt_completion"
    elif fmt == "sharegpt":
        renamed, fmt = {**renamed, **_sharegpt(renamed)}, "messages"
    problem = row_problem(renamed, fmt)
    if problem:
        raise RowProblem(problem)
    return renamed, fmt
