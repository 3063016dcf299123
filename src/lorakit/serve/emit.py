"""Turning a step's logits into each request's next token, text delta and end; each row fails alone.

A row whose logits are not finite, whose sampling raises or whose owner's callback raises ends with an error event;
its batch-mates are untouched. Every request's ``on_done`` (the adapter pin release) runs exactly once.
"""

from __future__ import annotations

import logging

import torch

from lorakit.errors import ServeError
from lorakit.serve.request import Event, GenRequest, RowState
from lorakit.serve.sampling import choose_token

_log = logging.getLogger("lorakit.serve")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Emitter:
    """Per-row token choice and the events a request's owner sees.

    Args:
        eos: Token ids that end a request (``finish_reason`` "stop").
        context: Most tokens (prompt + generated) per row: a row reaching it ends with "length".
        metrics: Optional `lorakit.serve.metrics.Metrics` to update.
    """

    def __init__(self, eos: set[int], context: int, metrics=None) -> None:
        self.eos, self.context, self.metrics = eos, context, metrics

    def emit_all(self, rows: list[RowState], logits: torch.Tensor) -> list[int]:
        """Emit one token per row from ``logits`` ``(rows, vocab)``; the indices of rows still running."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = logits.argmax(dim=-1).tolist()  # one pass and one copy for every greedy row of the batch
        alive = []
        for i, row in enumerate(rows):
            try:
                if not finite[i]:
                    raise ServeError(
                        "the model produced NaN or Inf logits for this request (its adapter's weights may be "
                        "broken); the request was stopped"
                    )
                params = row.req.params
                token = greedy[i] if params.temperature <= 0 else choose_token(logits[i], params, row.gen)
                done = self.emit(row, token)
            except Exception as exc:  # noqa: BLE001 - this row fails, its batch-mates go on
                self.fail(row.req, exc)
                done = True
            if not done:
                alive.append(i)
        return alive

    def emit(self, row: RowState, token: int) -> bool:
        """Give ``token`` to the row's owner; return whether the request is finished."""
        req, params = row.req, row.req.params
        row.last, row.generated = token, row.generated + 1
        if self.metrics:
            self.metrics.tokens(1)
        if token in self.eos and not params.ignore_eos:
            text, reason = row.stream.flush(), "stop"
        else:
            text, hit = row.stream.push(token)
            reason = "stop" if hit else None
            if reason is None and (row.generated >= params.max_tokens or row.pos + 1 >= self.context):
                text, reason = text + row.stream.flush(), "length"
        event = Event(text, reason, len(req.prompt_ids), row.generated)
        if reason is not None:
            self.finish(req, event)
        else:
            req.on_event(event)
        return reason is not None

    def fail(self, req: GenRequest, exc: BaseException) -> None:
        error = str(exc) if isinstance(exc, ServeError) else describe(exc)
        self.finish(req, Event("", "error", len(req.prompt_ids), error=error))

    def finish(self, req: GenRequest, event: Event) -> None:
        """End ``req`` with ``event``; its callbacks may raise, and `on_done` (the pin release) always runs."""
        if req.finished:
            return
        req.finished, req.finish_reason = True, event.finish_reason
        if self.metrics:
            self.metrics.finished(event.finish_reason or "error")
        for callback in (lambda: req.on_event(event), req.on_done):
            try:
                if callback is not None:
                    callback()
            except Exception:  # noqa: BLE001 - an owner's callback must not stop the scheduler
                _log.exception("lorakit serve: a request callback raised")
