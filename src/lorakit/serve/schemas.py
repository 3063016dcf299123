"""OpenAPI descriptions of the JSON bodies the server reads by hand (`lorakit.serve.protocol` validates them).

The routes take the raw request (so every problem gets OpenAI's error shape, not FastAPI's), which leaves
FastAPI's schema without request bodies; these fill them in, for clients, for /docs, and for the property-based
fuzzing in the tests (schemathesis generates bodies from them).
"""

from __future__ import annotations

_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}, {"type": "null"}]}
_COMMON = {
    "model": {"type": "string", "minLength": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1},
    "stop": _STOP,
    "seed": {"type": ["integer", "null"]},
    "ignore_eos": {"type": "boolean"},
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
    },
}
COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            ]
        },
    },
}
CHAT = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": False,
    "properties": {
        **_COMMON,
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "additionalProperties": False,
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                    "content": {"type": "string"},
                },
            },
        },
    },
}
ADD_ADAPTER = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}, "path": {"type": "string"}},
}


def bounded(schema: dict, limits) -> dict:
    """``schema`` with this server's `lorakit.serve.limits.Limits` written in (maximum tokens, n, prompts, stops)."""
    props = dict(schema["properties"])
    for key in ("max_tokens", "max_completion_tokens"):
        if key in props:
            props[key] = {**props[key], "maximum": limits.max_tokens}
    props["n"] = {**props["n"], "maximum": limits.max_n}
    text, items = {"type": "string", "maxLength": limits.max_stop_chars}, {"maxItems": limits.max_stops}
    props["stop"] = {"anyOf": [text, {"type": "array", "items": text, **items}, {"type": "null"}]}
    if "prompt" in props:
        props["prompt"] = {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                 "maxItems": limits.max_prompts},
                {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": limits.vocab_size - 1},
                 "minItems": 1},
            ]
        }  # fmt: skip
    return {**schema, "properties": props}


def body(schema: dict) -> dict:
    """``openapi_extra`` for a route whose JSON body follows ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
