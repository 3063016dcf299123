"""Continuous batching: one scheduler thread runs every forward pass; requests join and leave between steps.

Each step the scheduler (1) runs queued model changes (adapter loads/deletes) between forward passes, (2) drops
cancelled requests, (3) prefills newly admitted requests together and adds them to the running batch, and (4) runs
one decode step for all running rows, each with its own adapter. The forward passes are a `lorakit.serve.steps`
model step: the fast decode engine by default, transformers' forward (the reference path) when asked or whenever
the model holds something the engine cannot apply (a DoRA adapter, say) - the switch waits for the batch to drain.

Failures stay with the request that caused them: a row whose logits are not finite, whose sampling or callback
raises, fails alone (`lorakit.serve.emit`); a failed prefill group is retried one request at a time; a failed
decode step is undone (a step's contract) and each row is probed alone, so only the rows that fail alone get an
error and the rest continue exactly as they would have. If the loop itself ever stops, every waiting request gets
an error at once, later submissions are refused, and `alive` turns False (the server's /health answers 503).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from lorakit.errors import ServeError
from lorakit.serve.emit import Emitter, describe
from lorakit.serve.request import Event, GenRequest, RowState
from lorakit.serve.sampling import SamplingParams, TextStream, make_generator
from lorakit.serve.steps import EngineStep, ModelStep, ReferenceStep

__all__ = ["Batcher", "Event", "GenRequest", "SamplingParams"]
MAX_PREFILL_TOKENS = 4096  # most (padded) tokens in one prefill pass
_log = logging.getLogger("lorakit.serve")


class Batcher:
    """Schedules `GenRequest` s over one model with a KV cache and per-row adapters.

    Args:
        model: A causal LM (transformers), possibly with lorakit adapters.
        tokenizer: Its tokenizer (for text deltas and stop strings).
        max_batch_size: Most requests decoding together; the rest wait in the queue.
        routed: Apply each request's adapter (False in merged mode: plain forwards).
        metrics: Optional `lorakit.serve.metrics.Metrics` to update.
        weights: Run the fast decode engine with base weights in this format (`lorakit.inference.WEIGHT_FORMATS`);
            None: transformers' forward only (the reference path).
        prefix_cache_mb: The engine's memory for reusable prompt starts (`lorakit.inference.prefix`); 0: off.
        cuda_graphs: The engine replays decode steps as CUDA graphs (None: on for CUDA models).
    """

    def __init__(
        self, model, tokenizer, *, max_batch_size: int = 8, routed: bool = True, metrics=None,
        weights: str | None = None, prefix_cache_mb: float = 256.0, cuda_graphs: bool | None = None,
    ) -> None:  # fmt: skip
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.routed, self.metrics = routed, metrics
        context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
        self.reference = ReferenceStep(model, routed)
        self.engine = None
        if weights is not None:
            self.engine = EngineStep(model, weights=weights, max_batch=max_batch_size, routed=routed,
                                     prefix_cache_mb=prefix_cache_mb, cuda_graphs=cuda_graphs)  # fmt: skip
        self.step: ModelStep = self.reference if self.engine is None else self.engine
        self._wanted = self.step
        self.context = context if self.engine is None else min(context, self.engine.max_len)
        self._emitter = Emitter({int(t) for e in eos for t in (e if isinstance(e, list) else [e]) if t is not None},
                                self.context, metrics)  # fmt: skip
        self._cond = threading.Condition()
        self._pending: deque[GenRequest] = deque()
        self._commands: list[tuple[Callable, Future]] = []
        self._running: list[RowState] = []
        self._model_changed = True  # check which step can run the model before the next admission
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
            self._model_changed = True
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
            self.failure = describe(exc)
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
                if self._choose_step():
                    self._admit()
                if self._running:
                    self._decode()

    def _run_commands(self, commands: list[tuple[Callable, Future]]) -> None:
        for fn, future in commands:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)
        self._model_changed = True
        self.step.model_changed()

    def _choose_step(self) -> bool:
        """Use the engine when it can run the model as it is now, else the reference; whether to admit now.

        A switch waits until the running batch has drained (their caches live in the current step).
        """
        if self.engine is None:
            return True
        if self._model_changed:
            reason = self.engine.supported()
            self._wanted, self._model_changed = (self.engine if reason is None else self.reference), False
            if reason is not None and self._wanted is not self.step:
                _log.info("lorakit serve: the reference path serves new requests (%s)", reason)
        if self._wanted is self.step:
            return True
        if not self._running:
            self.step.reset()
            self.step = self._wanted
            self._wanted.model_changed()
            return True
        return False

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
                self._emitter.fail(group[0], exc)
                return
        for req in group:
            try:
                self._prefill([req])
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                self._emitter.fail(req, exc)

    def _valid_ids(self, req: GenRequest) -> bool:
        bad = [t for t in req.prompt_ids if not 0 <= t < self.vocab]
        if bad or not req.prompt_ids:
            error = ServeError(f"prompt token id {bad[0] if bad else None} is not in 0..{self.vocab - 1}")
            self._emitter.fail(req, error)
        return not bad and bool(req.prompt_ids)

    def _prefill(self, group: list[GenRequest]) -> None:
        """One forward pass over the prompts of ``group``; the rows join the running batch, finished ones leave."""
        first, cached = len(self._running), self.step.cached_tokens
        logits = self.step.prefill([r.prompt_ids for r in group], tuple(r.adapter for r in group))
        if self.metrics:
            self.metrics.cached_prompt_tokens(self.step.cached_tokens - cached)
        rows = []
        for req in group:
            if self.metrics:
                self.metrics.prompt_tokens(len(req.prompt_ids))
            row = RowState(req, TextStream(self.tokenizer, req.params.stop), make_generator(req.params.seed))
            row.pos = len(req.prompt_ids)
            rows.append(row)
        self._running.extend(rows)  # step rows and scheduler rows always line up
        alive = self._emitter.emit_all(rows, logits)
        if len(alive) < len(rows):
            self._keep([*range(first), *(first + i for i in alive)])

    def _decode(self) -> None:
        rows = self._running
        try:
            logits = self._step(rows)
        except Exception as exc:  # noqa: BLE001 - the step was undone: find the culprit rows, serve the rest
            self._isolate(exc)
            return
        if self.metrics:
            self.metrics.batch(len(rows))
        for r in rows:
            r.pos += 1
        alive = self._emitter.emit_all(rows, logits)
        if len(alive) < len(rows):
            for i in sorted(set(range(len(rows))) - set(alive)):
                if rows[i].req.finish_reason in ("stop", "length"):  # answered: a next turn may start with it all
                    self.step.remember(i, rows[i].req.prompt_ids + rows[i].stream.ids)
            self._keep(alive)

    def _step(self, rows: list[RowState]) -> torch.Tensor:
        adapters = tuple(r.req.adapter for r in rows)
        return self.step.decode([r.last for r in rows], [r.pos for r in rows], adapters)

    def _isolate(self, exc: Exception) -> None:
        """After a failed decode step: run each row alone (nothing kept); fail the rows that fail.

        The survivors were not advanced, so the next step repeats theirs exactly. If every row succeeds alone,
        the failure belongs to the batch as a whole and every row fails (no retry loop).
        """
        culprits = []
        for i, row in enumerate(self._running):
            try:
                with self.step.only_row(i, row.req.adapter):
                    self._step([row])
            except Exception as alone:  # noqa: BLE001 - this row fails by itself
                culprits.append((i, alone))
        if not culprits:
            culprits = [(i, exc) for i in range(len(self._running))]
        for i, error in culprits:
            self._emitter.fail(self._running[i].req, error)
        bad = {i for i, _ in culprits}
        self._keep([i for i in range(len(self._running)) if i not in bad])

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._pending if r.cancelled]
            self._pending = deque(r for r in self._pending if not r.cancelled)
        for req in gone:
            self._emitter.finish(req, Event("", "cancelled"))
        keep = [i for i, r in enumerate(self._running) if not r.req.cancelled]
        if len(keep) < len(self._running):
            for r in self._running:
                if r.req.cancelled:
                    self._emitter.finish(r.req, Event("", "cancelled", len(r.req.prompt_ids), r.generated))
            self._keep(keep)

    def _keep(self, indices: list[int]) -> None:
        self._running = [self._running[i] for i in indices]
        self.step.keep(indices)

    def _shutdown(self) -> None:
        try:
            self.step.reset()
        except Exception:  # noqa: BLE001 - shutting down anyway
            _log.exception("lorakit serve: releasing the model step failed")
        with self._cond:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            commands, self._commands = self._commands, []
        why = f"the scheduler stopped ({self.failure})" if self.failure else "the server is shutting down"
        for req in [r.req for r in self._running] + pending:
            self._emitter.finish(req, Event("", "error", error=why, fatal=True))
        for _, future in commands:
            future.set_exception(ServeError(why))
        self._running = []
