"""OpenAI request validation and response shapes: every problem becomes an `ApiError` with OpenAI's error JSON."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from lorakit.serve.sampling import SamplingParams

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
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts: the model's context length and the most tokens one request may ask for."""

    context: int
    max_tokens: int


@dataclass(frozen=True)
class Job:
    """A validated request: token ids per choice, sampling, and how to answer."""

    model: str
    prompts: list[list[int]]
    params: SamplingParams
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
        prompts = [encode_prompt(tokenizer, p) for p in _prompts(body)]
    for key, fine in _UNSUPPORTED.items():
        if body.get(key) not in fine:
            raise ApiError(400, f"'{key}' is not supported by lorakit serve; leave it out", param=key)
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n={n!r} is not supported; send one request per completion (n=1)", param="n")
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
    default = min(limits.max_tokens, room) if chat else min(DEFAULT_COMPLETION_TOKENS, room)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key, None)
    max_tokens = default if max_tokens is None else max_tokens
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
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        stop=_stop(body.get("stop")),
        seed=_seed(body.get("seed")),
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return Job(model, prompts, params, stream, include_usage, chat)


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


def _prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is a required field", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
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


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of at most 4 strings, got {stop!r}", param="stop")
    return tuple(s for s in stops if s)


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
