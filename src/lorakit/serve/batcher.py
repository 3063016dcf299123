"""Continuous batching: one scheduler thread runs every forward pass; requests join and leave between steps.

Each step the scheduler (1) runs queued model changes (adapter loads/deletes) while no route is open, (2) drops
cancelled requests, (3) prefills newly admitted requests together in one left-padded pass and
splices their caches into the batch (`lorakit.serve.kvcache`), and (4) runs one decode step for all running rows,
each with its own adapter through `lorakit.route`. The route stays open while the set of rows is unchanged, so
its cached stacked factors serve every decode step of that batch.

Failures stay with the request that caused them: a row whose logits are not finite, whose sampling or callback
raises, fails alone; a failed prefill group is retried one request at a time; a failed decode step is undone
(the cache truncated back) and each row is probed alone, so only the rows that fail alone get an error and the
rest continue exactly as they would have. If the loop itself ever stops, every waiting request gets an error at
once, later submissions are refused, and `alive` turns False (the server's /health answers 503).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from lorakit.errors import ServeError
from lorakit.serve.forward import Forward
from lorakit.serve.kvcache import BatchCache
from lorakit.serve.request import Event, GenRequest, RowState
from lorakit.serve.sampling import SamplingParams, TextStream, choose_token, make_generator

__all__ = ["Batcher", "Event", "GenRequest", "SamplingParams"]
MAX_PREFILL_TOKENS = 4096  # most (padded) tokens in one prefill pass
_log = logging.getLogger("lorakit.serve")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Batcher:
    """Schedules `GenRequest` s over one model with a KV cache and per-row adapters.

    Args:
        model: A causal LM (transformers), possibly with lorakit adapters.
        tokenizer: Its tokenizer (for text deltas and stop strings).
        max_batch_size: Most requests decoding together; the rest wait in the queue.
        routed: Apply each request's adapter with `lorakit.route` (False in merged mode: plain forwards).
        metrics: Optional `lorakit.serve.metrics.Metrics` to update.
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, routed: bool = True, metrics=None) -> None:
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.routed, self.metrics = routed, metrics
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
        self.eos = {int(t) for e in eos for t in (e if isinstance(e, list) else [e]) if t is not None}
        self._cond = threading.Condition()
        self._pending: deque[GenRequest] = deque()
        self._commands: list[tuple[Callable, Future]] = []
        self._running: list[RowState] = []
        self._cache = BatchCache()
        self._forward = Forward(model, routed)
        self._stop = False
        self._closed = False  # set under the lock when the loop ends: later submissions are refused
        self.failure: str | None = None  # why the loop stopped, if it failed
        self.vocab = int(model.get_input_embeddings().weight.shape[0])
        self._thread = threading.Thread(target=self._loop, name="lorakit-batcher", daemon=True)

    # ---- called from other threads ------------------------------------------------------------------------
    def start(self) -> Batcher:
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; unfinished requests end with an error event."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """False once the scheduler loop has ended (failed or closed)."""
        return not self._closed

    def submit(self, req: GenRequest) -> None:
        """Queue ``req``.

        Raises:
            ServeError: the scheduler has stopped (the request was not queued; its callbacks are not called).
        """
        with self._cond:
            if self._closed:
                raise ServeError(f"the scheduler has stopped ({self.failure or 'the server is shutting down'})")
            self._pending.append(req)
            self._cond.notify_all()

    def cancel(self, req: GenRequest) -> None:
        """Mark ``req`` cancelled (e.g. its client went away); its slot is freed before the next step."""
        with self._cond:
            req.cancelled = True
            self._cond.notify_all()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the scheduler thread between steps (model changes must not race a forward pass)."""
        future: Future = Future()
        if not self._thread.is_alive():  # not started (tests, CLI setup): run here
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
            return future
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- scheduler thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException as exc:  # noqa: BLE001 - reported to every waiter and by /health
            self.failure = _describe(exc)
            _log.exception("lorakit serve: the scheduler loop stopped")
        finally:
            self._shutdown()

    def _steps(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._pending or self._commands or self._running):
                    self._cond.wait()
                if self._stop:
                    break
                commands, self._commands = self._commands, []
            if commands:
                self._run_commands(commands)
            with torch.no_grad():
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._decode()

    def _run_commands(self, commands: list[tuple[Callable, Future]]) -> None:
        self._forward.close_route()  # a route's cache is keyed by layer identity: never keep one across model changes
        for fn, future in commands:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)

    def _admit(self) -> None:
        """Prefill waiting requests (together, within a token budget) while the batch has room."""
        while len(self._running) < self.max_batch_size:
            group: list[GenRequest] = []
            with self._cond:
                while self._pending and len(self._running) + len(group) < self.max_batch_size:
                    req = self._pending[0]
                    width = max([len(req.prompt_ids), *(len(r.prompt_ids) for r in group)])
                    if group and width * (len(group) + 1) > MAX_PREFILL_TOKENS:
                        break
                    group.append(self._pending.popleft())
            if not group:
                return
            self._prefill_isolated(group)

    def _prefill_isolated(self, group: list[GenRequest]) -> None:
        """Prefill ``group`` together; if that fails, each request alone, so only the culprit gets the error."""
        group = [r for r in group if self._valid_ids(r)]
        try:
            if group:
                self._prefill(group)
            return
        except Exception as exc:  # noqa: BLE001 - a bad request must not stop the server
            if len(group) == 1:
                self._fail(group[0], exc)
                return
        for req in group:
            try:
                self._prefill([req])
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                self._fail(req, exc)

    def _valid_ids(self, req: GenRequest) -> bool:
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab]
        if bad or not req.prompt_ids:
            self._fail(req, ServeError(f"prompt token id {bad[0] if bad else None} is not in 0..{self.vocab - 1}"))
        return not bad and bool(req.prompt_ids)

    def _prefill(self, group: list[GenRequest]) -> None:
        """One left-padded forward pass over the prompts of ``group``; their caches join the running batch."""
        joined, logits = self._forward.prefill([r.prompt_ids for r in group], tuple(r.adapter for r in group))
        rows = []
        for req in group:
            if self.metrics:
                self.metrics.prompt_tokens(len(req.prompt_ids))
            row = RowState(req, TextStream(self.tokenizer, req.params.stop), make_generator(req.params.seed))
            row.pos = len(req.prompt_ids)
            rows.append(row)
        alive = self._emit_all(rows, logits)
        if alive:  # rows and cache rows join together, so they always line up
            joined.keep(alive)
            self._cache.add(joined.cache, joined.pad)
            self._running.extend(rows[i] for i in alive)

    def _decode(self) -> None:
        rows, length = self._running, self._cache.length
        try:
            self._forward.open_route(tuple(r.req.adapter for r in rows))
            logits = self._step(rows)
        except Exception as exc:  # noqa: BLE001 - undo the step, find the culprit rows, keep serving the rest
            self._forward.close_route()
            self._cache.truncate(length)
            self._isolate(exc)
            return
        if self.metrics:
            self.metrics.batch(len(rows))
        for r in rows:
            r.pos += 1
        alive = self._emit_all(rows, logits)
        if len(alive) < len(rows):
            self._keep(alive)

    def _step(self, rows: list[RowState]) -> torch.Tensor:
        return self._forward.decode([r.last for r in rows], [r.pos for r in rows], self._cache)

    def _isolate(self, exc: Exception) -> None:
        """After a failed decode step: run each row alone (its cache appends discarded); fail the rows that fail.

        The survivors were not advanced, so the next step repeats theirs exactly. If every row succeeds alone,
        the failure belongs to the batch as a whole and every row fails (no retry loop).
        """
        culprits = []
        for i, row in enumerate(self._running):
            try:
                with self._cache.only_row(i), self._forward.routing((row.req.adapter,)):
                    self._step([row])
            except Exception as alone:  # noqa: BLE001 - this row fails by itself
                culprits.append((i, alone))
        if not culprits:
            culprits = [(i, exc) for i in range(len(self._running))]
        for i, error in culprits:
            self._fail(self._running[i].req, error)
        bad = {i for i, _ in culprits}
        self._keep([i for i in range(len(self._running)) if i not in bad])

    def _emit_all(self, rows: list[RowState], logits: torch.Tensor) -> list[int]:
        """Emit one token per row from ``logits`` (rows, vocab); the indices of rows still running.

        Each row fails alone: non-finite logits, a sampling error or a raising callback end that request only.
        """
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        alive = []
        for i, row in enumerate(rows):
            try:
                if not finite[i]:
                    raise ServeError(
                        "the model produced NaN or Inf logits for this request (its adapter's weights may be "
                        "broken); the request was stopped"
                    )
                done = self._emit(row, logits[i])
            except Exception as exc:  # noqa: BLE001 - this row fails, its batch-mates go on
                self._fail(row.req, exc)
                done = True
            if not done:
                alive.append(i)
        return alive

    def _emit(self, row: RowState, logits: torch.Tensor) -> bool:
        """Pick the row's next token and tell its owner; return whether the request is finished."""
        req, params = row.req, row.req.params
        token = choose_token(logits, params, row.gen)
        row.last, row.generated = token, row.generated + 1
        if self.metrics:
            self.metrics.tokens(1)
        if token in self.eos:
            text, reason = row.stream.flush(), "stop"
        else:
            text, hit = row.stream.push(token)
            reason = "stop" if hit else None
            if reason is None and (row.generated >= params.max_tokens or row.pos + 1 >= self.context):
                text, reason = text + row.stream.flush(), "length"
        event = Event(text, reason, len(req.prompt_ids), row.generated)
        if reason is not None:
            self._finish(req, event)
        else:
            req.on_event(event)
        return reason is not None

    def _fail(self, req: GenRequest, exc: BaseException) -> None:
        error = str(exc) if isinstance(exc, ServeError) else _describe(exc)
        self._finish(req, Event("", "error", len(req.prompt_ids), error=error))

    def _finish(self, req: GenRequest, event: Event) -> None:
        """End ``req`` with ``event``; its callbacks may raise, and `on_done` (the pin release) always runs."""
        if req.finished:
            return
        req.finished = True
        if self.metrics:
            self.metrics.finished(event.finish_reason or "error")
        for callback in (lambda: req.on_event(event), req.on_done):
            try:
                if callback is not None:
                    callback()
            except Exception:  # noqa: BLE001 - an owner's callback must not stop the scheduler
                _log.exception("lorakit serve: a request callback raised")

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._pending if r.cancelled]
            self._pending = deque(r for r in self._pending if not r.cancelled)
        for req in gone:
            self._finish(req, Event("", "cancelled"))
        keep = [i for i, r in enumerate(self._running) if not r.req.cancelled]
        if len(keep) < len(self._running):
            for r in self._running:
                if r.req.cancelled:
                    self._finish(r.req, Event("", "cancelled", len(r.req.prompt_ids), r.generated))
            self._keep(keep)

    def _keep(self, indices: list[int]) -> None:
        self._running = [self._running[i] for i in indices]
        self._cache.keep(indices)

    def _shutdown(self) -> None:
        try:
            self._forward.close_route()
        except Exception:  # noqa: BLE001 - shutting down anyway
            _log.exception("lorakit serve: closing the route failed")
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            commands, self._commands = self._commands, []
        why = f"the scheduler stopped ({self.failure})" if self.failure else "the server is shutting down"
        for req in [r.req for r in self._running] + pending:
            self._finish(req, Event("", "error", error=why, fatal=True))
        for _, future in commands:
            future.set_exception(ServeError(why))
        self._running, self._cache = [], BatchCache()
