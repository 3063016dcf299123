"""The scheduler's model step: where the running rows' KV cache lives and how one prefill / decode step runs.

Two implementations of one small interface, so the scheduler (`lorakit.serve.batcher`) and its failure isolation
are written once:

- `EngineStep` (the default): `lorakit.inference.DecodeEngine`, a static KV cache over packed base weights
  (fp32: greedy outputs equal the reference path; fp16/bf16/int8/int4/nf4: smaller, measured in the README), each
  row's adapter applied from stacked factors, never merged.
- `ReferenceStep`: transformers' forward with a ``DynamicCache`` spliced per batch (`lorakit.serve.kvcache`) and
  each row's adapter through `lorakit.route`. It runs every model and adapter kind (DoRA, embeddings, sliding
  windows), so the scheduler falls back to it whenever the engine cannot run the model as it is now.

Contract of both: ``prefill`` appends its rows after the running ones (or raises and appends nothing); ``decode``
advances every row by one token (or raises and leaves every row where it was, so the step can be repeated);
inside ``only_row(i)`` the same calls touch row ``i`` alone and nothing they do is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import Tensor

from lorakit.serve.forward import Forward
from lorakit.serve.kvcache import BatchCache

_log = logging.getLogger("lorakit.serve")


class ModelStep(Protocol):
    """What the scheduler needs from a model runner (see the module docstring for the contract)."""

    cached_tokens: int  # prompt tokens so far whose keys/values were reused, not computed

    def prefill(self, prompts: list[list[int]], adapters: tuple) -> Tensor: ...

    def decode(self, last: list[int], pos: list[int], adapters: tuple) -> Tensor: ...

    def only_row(self, index: int, adapter: str | None) -> AbstractContextManager[None]: ...

    def keep(self, indices: list[int]) -> None: ...

    def remember(self, index: int, tokens: list[int]) -> None: ...

    def model_changed(self) -> None: ...

    def reset(self) -> None: ...


class ReferenceStep:
    """Transformers' forward over a spliced ``DynamicCache``, adapters through `lorakit.route`.

    Args:
        model: A causal LM (transformers), possibly with lorakit adapters.
        routed: Apply each row's adapter (False in merged mode: plain forwards).
    """

    name = "reference"
    cached_tokens = 0

    def __init__(self, model, routed: bool) -> None:
        self.forward = Forward(model, routed)
        self.cache = BatchCache()
        self._alone = False  # inside only_row: its own route is open, the batch route stays closed

    def prefill(self, prompts: list[list[int]], adapters: tuple) -> Tensor:
        """One left-padded pass over ``prompts``; their cache rows join the batch. Logits ``(n, vocab)``."""
        joined, logits = self.forward.prefill(prompts, adapters)
        self.cache.add(joined.cache, joined.pad)
        return logits

    def decode(self, last: list[int], pos: list[int], adapters: tuple) -> Tensor:
        """One step for every row; on failure the cache is truncated back and the route closed."""
        length = self.cache.length
        try:
            if not self._alone:
                self.forward.open_route(adapters)
            return self.forward.decode(last, pos, self.cache)
        except BaseException:
            self.forward.close_route()
            self.cache.truncate(length)
            raise

    @contextmanager
    def only_row(self, index: int, adapter: str | None) -> Iterator[None]:
        self.forward.close_route()
        self._alone = True
        try:
            with self.cache.only_row(index), self.forward.routing((adapter,)):
                yield
        finally:
            self._alone = False

    def keep(self, indices: list[int]) -> None:
        self.cache.keep(indices)

    def remember(self, index: int, tokens: list[int]) -> None:
        """The reference path keeps no prefix cache."""

    def model_changed(self) -> None:
        self.forward.close_route()  # a route's cache is keyed by layer identity: never keep one across changes

    def reset(self) -> None:
        self.forward.close_route()
        self.cache = BatchCache()


class EngineStep:
    """`lorakit.inference.DecodeEngine` as the scheduler's step (static cache, packed weights, per-row adapters).

    Args:
        model: A Llama-family causal LM the engine supports (`lorakit.inference.unsupported_reason`).
        weights: Base weight format (`lorakit.inference.WEIGHT_FORMATS`).
        max_batch: Most rows decoding together.
        routed: Apply each row's adapter (False in merged mode: every row runs the bare, merged model).
        prefix_cache_mb: Memory for reusable prompt starts (`lorakit.inference.prefix`); 0: off.
        cuda_graphs: Replay decode steps as CUDA graphs (`lorakit.inference.graphs`); None: on for CUDA models.
    """

    name = "engine"

    def __init__(
        self, model, *, weights: str, max_batch: int, routed: bool, prefix_cache_mb: float = 256.0,
        cuda_graphs: bool | None = None,
    ) -> None:  # fmt: skip
        from lorakit.inference import DecodeEngine

        self.model, self.routed = model, routed
        context = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)  # the cache grows on demand
        self.engine = DecodeEngine(model, weights=weights, max_batch=max_batch, max_len=context,
                                   prefix_cache_mb=prefix_cache_mb, cuda_graphs=cuda_graphs)  # fmt: skip

    @property
    def cached_tokens(self) -> int:
        return self.engine.prefix.hit_tokens

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def supported(self) -> str | None:
        """Why the engine cannot run the model as it is now (an adapter kind it does not apply); None: it can."""
        from lorakit.inference import unsupported_reason

        return unsupported_reason(self.model)

    def _rows(self, adapters: Sequence[str | None]) -> list[str | None]:
        return list(adapters) if self.routed else [None] * len(adapters)

    def prefill(self, prompts: list[list[int]], adapters: tuple) -> Tensor:
        return self.engine.prefill(prompts, self._rows(adapters))

    def decode(self, last: list[int], pos: list[int], adapters: tuple) -> Tensor:
        """One step; the engine's own lengths are the positions (``pos`` must agree, it is not re-sent)."""
        return self.engine.decode(torch.tensor(last))

    @contextmanager
    def only_row(self, index: int, adapter: str | None) -> Iterator[None]:
        with self.engine.only_row(index):
            yield

    def keep(self, indices: list[int]) -> None:
        self.engine.keep(indices)

    def remember(self, index: int, tokens: list[int]) -> None:
        """Offer a finished row's prompt and answer to the engine's prefix cache (a next chat turn starts so).

        The cache only saves work: a failure here is logged, never raised into the scheduler.
        """
        try:
            self.engine.remember(index, tokens)
        except Exception:  # noqa: BLE001 - an optimization must not stop the server
            _log.exception("lorakit serve: offering a finished row to the prefix cache failed")

    def model_changed(self) -> None:
        """Re-read adapter factors (and re-pack changed base weights) after a model change between steps."""
        if self.engine.rows and self.supported() is None:
            self.engine.sync_adapters()

    def reset(self) -> None:
        self.engine.reset()
