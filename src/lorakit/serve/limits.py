"""What one server accepts: every size a client controls has a cap with a clear answer when it is exceeded.

The defaults suit a server shared by a team on one machine; each is a ``lorakit serve`` flag (README, "Running it
on a network"). Everything here is checked before a request reaches the scheduler, so no request can make the
scheduler thread do unbounded work.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lorakit.errors import ConfigError

DEFAULT_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Limits:
    """Caps on what one request (and the queue) may hold.

    Attributes:
        max_tokens: Most tokens one request may ask for (also capped by the context length).
        max_body_bytes: Largest request body (413 above it).
        max_prompts: Most prompts in one /v1/completions request.
        max_n: Most choices per prompt (``n``).
        max_stops: Most stop strings.
        max_stop_chars: Longest stop string, in characters.
        max_queue: Most requests waiting for a batch slot; more get 429 with ``Retry-After``.
        request_timeout_s: A request still unfinished after this many seconds is cancelled (504 / a stream error).
        context: The model's context length (set from the model by `lorakit.serve.server.build_state`).
        vocab_size: Rows of the model's embedding table: prompt token ids must be below it (set from the model).
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    max_body_bytes: int = 1 << 20
    max_prompts: int = 32
    max_n: int = 8
    max_stops: int = 4
    max_stop_chars: int = 256
    max_queue: int = 256
    request_timeout_s: float = 600.0
    context: int = 1 << 20
    vocab_size: int = 1 << 31

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if not _positive(getattr(self, f.name))]
        if bad:
            raise ConfigError(f"serving limits must be positive numbers, got {', '.join(bad)}")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
