"""Continuous batching: one scheduler thread runs every forward pass; requests join and leave between steps.

Each step the scheduler (1) runs queued model changes (adapter loads/deletes) while no route is open, (2) drops
cancelled requests, (3) prefills newly admitted requests together in one left-padded pass and
splices their caches into the batch (`lorakit.serve.kvcache`), and (4) runs one decode step for all running rows,
each with its own adapter through `lorakit.route`. The route stays open while the set of rows is unchanged, so
its cached stacked factors serve every decode step of that batch.
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext

import torch

import lorakit
from lorakit.serve.kvcache import BatchCache
from lorakit.serve.request import Event, GenRequest, RowState
from lorakit.serve.sampling import SamplingParams, TextStream, choose_token, make_generator

__all__ = ["Batcher", "Event", "GenRequest", "SamplingParams"]
MAX_PREFILL_TOKENS = 4096  # most (padded) tokens in one prefill pass


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
        self._route: AbstractContextManager | None = None
        self._route_rows: tuple | None = None
        self._stop = False
        # transformers >= 5.2x names the cache argument `cache` (and warns about `past_key_values`)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
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

    def submit(self, req: GenRequest) -> None:
        with self._cond:
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
        self._shutdown()

    def _run_commands(self, commands: list[tuple[Callable, Future]]) -> None:
        self._close_route()  # a route's cache is keyed by layer identity: never keep one across model changes
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
            try:
                self._prefill(group)
            except Exception as exc:  # noqa: BLE001 - a bad request must not stop the server
                for req in group:
                    self._finish(req, Event("", "error", error=f"{type(exc).__name__}: {exc}"))

    def _prefill(self, group: list[GenRequest]) -> None:
        """One left-padded forward pass over the prompts of ``group``; their caches join the running batch."""
        from transformers import DynamicCache

        device, width = self.model.device, max(len(r.prompt_ids) for r in group)
        pad = [width - len(r.prompt_ids) for r in group]
        ids = torch.tensor([[0] * p + r.prompt_ids for p, r in zip(pad, group)], device=device)  # (rows, width)
        mask = (torch.arange(width, device=device)[None, :] >= torch.tensor(pad, device=device)[:, None]).long()
        cache = DynamicCache(config=self.model.config)
        with self._routing(tuple(r.adapter for r in group)):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # (rows, width): each row counts from 0
                **{self._cache_kw: cache},
                use_cache=True,
                logits_to_keep=1,
            )
        joined = BatchCache()
        joined.add(cache, pad)
        alive, rows = [], []
        for i, req in enumerate(group):
            if self.metrics:
                self.metrics.prompt_tokens(len(req.prompt_ids))
            row = RowState(req, TextStream(self.tokenizer, req.params.stop), make_generator(req.params.seed))
            row.pos = len(req.prompt_ids)
            if not self._emit(row, out.logits[i, -1]):
                alive.append(i)
                rows.append(row)
        if alive:  # rows and cache rows join together, so they always line up
            joined.keep(alive)
            self._cache.add(joined.cache, joined.pad)
            self._running.extend(rows)

    def _decode(self) -> None:
        rows = self._running
        try:
            self._open_route(tuple(r.req.adapter for r in rows))
            device = self.model.device
            out = self.model(
                input_ids=torch.tensor([[r.last] for r in rows], device=device),  # (batch, 1)
                attention_mask=self._cache.step_mask(device),  # (batch, length + 1)
                position_ids=torch.tensor([[r.pos] for r in rows], device=device),  # (batch, 1)
                **{self._cache_kw: self._cache.cache},
                cache_position=torch.tensor([self._cache.length], device=device),
                use_cache=True,
                logits_to_keep=1,
            )
        except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
            self._close_route()
            for r in rows:
                self._finish(r.req, Event("", "error", error=f"{type(exc).__name__}: {exc}"))
            self._running, self._cache = [], BatchCache()
            return
        if self.metrics:
            self.metrics.batch(len(rows))
        alive = []
        for i, r in enumerate(rows):
            r.pos += 1
            if not self._emit(r, out.logits[i, -1]):
                alive.append(i)
        if len(alive) < len(rows):
            self._keep(alive)

    def _emit(self, row: RowState, logits: torch.Tensor, greedy: int | None = None) -> bool:
        """Pick the row's next token and tell its owner; return whether the request is finished.

        ``greedy``: the row's argmax when the caller took the whole batch's at once (greedy requests use it).
        """
        req, params = row.req, row.req.params
        use = greedy is not None and params.temperature <= 0
        token = greedy if use else choose_token(logits, params, row.gen)
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

    def _finish(self, req: GenRequest, event: Event) -> None:
        if req.finished:
            return
        req.finished = True
        if self.metrics:
            self.metrics.finished(event.finish_reason or "error")
        try:
            req.on_event(event)
        finally:
            if req.on_done is not None:
                req.on_done()

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

    # ---- routes -------------------------------------------------------------------------------------------
    def _routing(self, rows: tuple) -> AbstractContextManager:
        return lorakit.route(self.model, rows) if self.routed else nullcontext()

    def _open_route(self, rows: tuple) -> None:
        if rows == self._route_rows:
            return
        self._close_route()
        route = self._routing(rows)
        route.__enter__()
        self._route, self._route_rows = route, rows

    def _close_route(self) -> None:
        route, self._route, self._route_rows = self._route, None, None
        if route is not None:
            route.__exit__(None, None, None)

    def _shutdown(self) -> None:
        self._close_route()
        with self._cond:
            pending, self._pending = list(self._pending), deque()
            commands, self._commands = self._commands, []
        for req in [r.req for r in self._running] + pending:
            self._finish(req, Event("", "error", error="the server is shutting down"))
        for _, future in commands:
            future.set_exception(RuntimeError("the server is shutting down"))
        self._running, self._cache = [], BatchCache()
