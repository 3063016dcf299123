"""What flows between the HTTP layer and the scheduler: a `GenRequest` in, `Event` s out."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorakit.serve.sampling import SamplingParams, TextStream

_ids = itertools.count()


@dataclass(frozen=True)
class Event:
    """What the scheduler tells a request's owner after each token: new text, and the reason once finished."""

    text: str
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    fatal: bool = False  # the scheduler stopped (HTTP 503), rather than this request failing (500)


@dataclass(eq=False)
class GenRequest:
    """One generation request. ``on_event`` and ``on_done`` are called on the scheduler thread."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[Event], None]
    on_done: Callable[[], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False
    finished: bool = False
    finish_reason: str | None = None  # set with ``finished``


@dataclass(eq=False)
class RowState:
    """The scheduler's bookkeeping of one running request."""

    req: GenRequest
    stream: TextStream
    gen: torch.Generator
    pos: int = 0  # real tokens in the cache (the next position id)
    last: int = -1
    generated: int = 0
