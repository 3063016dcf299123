"""OpenAI request validation and response shapes: every problem becomes an `ApiError` with OpenAI's error JSON."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from lorakit.serve.limits import Limits
from lorakit.serve.sampling import SamplingParams

__all__ = ["ApiError", "Job", "Limits", "parse"]

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
# fields lorakit serve does not implement -> the values that mean "not used"
_UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
}


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """A validated request: token ids and sampling per choice (``n`` choices per prompt), and how to answer."""

    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    stream: bool
    include_usage: bool
    chat: bool


def parse(body: Any, tokenizer, limits: Limits, *, chat: bool) -> Job:
    """Validate a /v1/completions (``chat=False``) or /v1/chat/completions body and tokenize its prompt(s)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = _required(body, "model", str)
    if chat:
        prompts = [encode_chat(tokenizer, _messages(body))]
    else:
        prompts = [encode_prompt(tokenizer, p) for p in _prompts(body, limits.max_prompts)]
    for key, fine in _UNSUPPORTED.items():
        if body.get(key) not in fine:
            raise ApiError(400, f"'{key}' is not supported by lorakit serve; leave it out", param=key)
    _check_ids(prompts, limits, "messages" if chat else "prompt")
    max_tokens = _max_tokens(body, prompts, limits, chat)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        stop=_stop(body.get("stop"), limits),
        seed=_seed(body.get("seed")),
        ignore_eos=_flag(body, "ignore_eos"),
    )
    n = _n(body.get("n"), limits.max_n)
    choices = [(ids, _nth(params, j)) for ids in prompts for j in range(n)]
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return Job(model, [ids for ids, _ in choices], [p for _, p in choices], stream, include_usage, chat)


def _max_tokens(body: dict, prompts: list[list[int]], limits: Limits, chat: bool) -> int:
    longest = max(len(p) for p in prompts)
    if longest >= limits.context:
        raise ApiError(
            400,
            f"This model's maximum context length is {limits.context} tokens, but the prompt has {longest} "
            "tokens; shorten the prompt",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    room = limits.context - longest
    default = min(limits.max_tokens, room) if chat else min(DEFAULT_COMPLETION_TOKENS, limits.max_tokens, room)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key, None)
    max_tokens = default if max_tokens is None else _integral(max_tokens)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"{key} must be a positive integer, got {max_tokens!r}", param=key)
    if max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"{key}={max_tokens} is above this server's limit of {limits.max_tokens} tokens "
            "(set with --max-tokens); ask for fewer",
            param=key,
        )
    if longest + max_tokens > limits.context:
        raise ApiError(
            400,
            f"This model's maximum context length is {limits.context} tokens, but you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the completion); set {key} "
            f"to at most {room}",
            param=key,
            code="context_length_exceeded",
        )
    return max_tokens


def _check_ids(prompts: list[list[int]], limits: Limits, param: str) -> None:
    """Token ids must index the model's embedding table (one bad id would fail a shared prefill pass)."""
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise ApiError(
                400,
                f"token id {bad[0]} is outside this model's vocabulary (0 to {limits.vocab_size - 1}); send ids "
                "from its tokenizer",
                param=param,
            )
        if not ids:
            raise ApiError(400, "the prompt is empty; send at least one token", param=param)


def _n(n: Any, max_n: int) -> int:
    if n is None:
        return 1
    n = _integral(n)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n:
        raise ApiError(400, f"n must be an integer from 1 to {max_n} (set with --max-n), got {n!r}", param="n")
    return n


def _nth(params: SamplingParams, j: int) -> SamplingParams:
    """The sampling of choice ``j`` of a prompt: with a seed, choice j uses ``seed + j`` (distinct, reproducible)."""
    return params if j == 0 or params.seed is None else replace(params, seed=params.seed + j)


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a completion prompt (a string, or token ids passed through)."""
    if isinstance(prompt, list):
        return list(prompt)
    return list(tokenizer(prompt).input_ids)


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat: the tokenizer's chat template with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _required(body: dict, key: str, kind: type) -> Any:
    if key not in body or body[key] is None:
        raise ApiError(400, f"'{key}' is a required field", param=key, code="missing_required_parameter")
    if not isinstance(body[key], kind):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}, got {type(body[key]).__name__}", param=key)
    return body[key]


def _prompts(body: dict, max_prompts: int) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is a required field", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > max_prompts:
            raise ApiError(
                400,
                f"{len(prompt)} prompts in one request; this server takes at most {max_prompts} "
                "(set with --max-prompts); split the request",
                param="prompt",
            )
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids", param="prompt")


def _messages(body: dict) -> list[dict]:
    messages = _required(body, "messages", list)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    if not out:
        raise ApiError(400, "'messages' must hold at least one message", param="messages")
    return out


def _number(body: dict, key: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value > high or value < low or (open_low and value <= low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{key} must be a number in {bound}, got {value!r}", param=key)
    return float(value)


def _stop(stop: Any, limits: Limits) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    ok = isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    if not ok or len(stops) > limits.max_stops or any(len(s) > limits.max_stop_chars for s in stops):
        shown = repr(stop) if len(repr(stop)) < 200 else repr(stop)[:200] + "..."
        raise ApiError(
            400,
            f"stop must be a string or a list of at most {limits.max_stops} strings of at most "
            f"{limits.max_stop_chars} characters (set with --max-stops / --max-stop-chars), got {shown}",
            param="stop",
        )
    return tuple(s for s in stops if s)


def _integral(value: Any) -> Any:
    """``3.0`` as ``3`` (JSON has one number type; JSON Schema counts 3.0 as an integer); anything else as is."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {value!r}", param=key)
    return value


def _seed(seed: Any) -> int | None:
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
    return seed


# ---- responses --------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response(job: Job, rid: str, texts: list[str], reasons: list[str | None], use: dict) -> dict:
    """The non-streamed answer."""
    if job.chat:
        choices = [
            {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
    else:
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
    kind = "chat.completion" if job.chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": job.model,
        "choices": choices,
        "usage": use,
    }


def chunk(job: Job, rid: str, index: int, text: str | None, reason: str | None, *, role: bool = False) -> dict:
    """One streamed chunk (``chat.completion.chunk`` or ``text_completion``)."""
    if job.chat:
        delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": job.model, "choices": [choice]}


def usage_chunk(job: Job, rid: str, prompt: int, completion: int) -> dict:
    """The last streamed chunk when ``stream_options.include_usage`` is set: no choices, the token counts."""
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": job.model,
        "choices": [],
        "usage": usage(prompt, completion),
    }
