"""Per-row adapter routing: the one piece of ambient state in lorakit (a ContextVar), always reset in finally.

Inside ``with lorakit.route(model, ["a", "b", None])`` every LoRA layer applies adapter "a" to row 0 of its
input, "b" to row 1 and nothing to row 2 (rows are the first dimension). A ContextVar (not a global) keeps
concurrent requests in threads or asyncio tasks apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from lorakit.errors import RoutingError


@dataclass(frozen=True)
class Route:
    """Which adapter each row of the batch uses (None: the base model).

    ``cache`` holds per-layer stacked factors for inference (no autograd), reused across the forward passes of
    one ``generate`` call; it lives only as long as the route.
    """

    rows: tuple[str | None, ...]
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def check_batch(self, batch: int) -> None:
        """Raise `RoutingError` unless the input has one row per routed name."""
        if batch != len(self.rows):
            raise RoutingError(
                f"route has {len(self.rows)} adapter names but the input batch has {batch} rows; give one name "
                "(or None for the base model) per row. generate() with num_beams or num_return_sequences > 1 "
                "multiplies the rows: route the expanded batch or generate per request"
            )


_ROUTE: ContextVar[Route | None] = ContextVar("lorakit_route", default=None)


def current_route() -> Route | None:
    """The route in effect in this thread / task, if any."""
    return _ROUTE.get()


@contextmanager
def activate(route: Route) -> Iterator[Route]:
    """Put ``route`` in effect for the block; the previous route comes back even if the block raises."""
    token = _ROUTE.set(route)
    try:
        yield route
    finally:
        _ROUTE.reset(token)
