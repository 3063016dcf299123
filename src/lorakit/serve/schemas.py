"""OpenAPI descriptions of the JSON bodies the server reads by hand (`lorakit.serve.protocol` validates them).

The routes take the raw request (so every problem gets OpenAI's error shape, not FastAPI's), which leaves
FastAPI's schema without request bodies; these fill them in, for clients, for /docs, and for the property-based
fuzzing in the tests (schemathesis generates bodies from them).
"""

from __future__ import annotations

_NUMBER = {"type": "number"}
_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
_COMMON = {
    "model": {"type": "string"},
    "max_tokens": {"type": ["integer", "null"]},
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "n": {"type": "integer"},
    "stop": _STOP,
    "seed": {"type": ["integer", "null"]},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
}
COMPLETION = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer"}},
            ]
        },
    },
}
CHAT = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_COMMON,
        "max_completion_tokens": {"type": ["integer", "null"]},
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
            },
        },
    },
}
ADD_ADAPTER = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "path": {"type": "string"}},
}


def body(schema: dict) -> dict:
    """``openapi_extra`` for a route whose JSON body follows ``schema``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
