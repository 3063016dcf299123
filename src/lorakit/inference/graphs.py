"""CUDA graphs of the decode step: captured once per batch shape, then replayed with new inputs.

A decode step of a small model on a GPU is hundreds of tiny kernels (norms, fused projections, each projection's
adapter matmuls, attention), so its time goes to launching them from Python, not to running them. A CUDA graph
records the step's kernels once and replays them in one launch. A graph replays fixed memory addresses and
shapes, so the captured step differs from the eager one in two ways:

- attention reads the whole allocated cache (``T`` columns) with a mask past each row's position, instead of the
  columns up to the longest row (masked columns add exact zeros to the softmax sums);
- its inputs (tokens, positions, the adapters' rank-column masks) live in static buffers, copied in before each
  replay.

A graph is keyed by what its addresses and shapes depend on: the number of rows and their first slot, the cache
tensor and its size, the batch's adapter factors (`BatchAdapters.generation`) and the layout of its column masks.
Anything else re-captures (an LRU keeps the last ``limit`` graphs, in one shared memory pool). Prefill stays eager:
its shapes change with every prompt.

``capture=False`` runs the same static step eagerly from the static buffers (what a replay computes), for CPUs
and for tests of the bookkeeping; only a CUDA device captures real graphs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lorakit.inference.engine import DecodeEngine

GRAPH_FORMATS = ("fp32", "fp16", "bf16")  # int8/int4 are CPU kernels; nf4 dequantizes per call


class GraphCaptureError(RuntimeError):
    """Recording a decode step as a CUDA graph failed (the engine then decodes eagerly)."""


@dataclass
class _Step:
    tokens: Tensor  # (rows,) static input
    positions: Tensor  # (rows,)
    masks: list[Tensor]  # static copies of the batch's distinct column masks
    run: Callable[[], Tensor]  # replay (or, without capture, the static step itself)
    out: Tensor | None = None  # (rows, hidden), inside the graph's memory


class DecodeGraphs:
    """The captured decode steps of one `DecodeEngine`.

    Args:
        engine: The engine whose decode step is captured (its cache, blocks and adapters are read at capture).
        capture: Record real CUDA graphs (default: when the engine runs on CUDA).
        limit: Most graphs kept (least recently used go first).

    Attributes:
        captures: Graphs recorded so far (re-captures included). A capture that raises is re-raised as
            `GraphCaptureError`, the engine's to handle (it decodes eagerly from then on); a replay that raises
            raises as it is.
    """

    def __init__(self, engine: DecodeEngine, *, capture: bool | None = None, limit: int = 64) -> None:
        self.engine, self.limit = engine, limit
        self.capture = engine.device.type == "cuda" if capture is None else capture
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps: OrderedDict[tuple, _Step] = OrderedDict()
        self.captures = 0

    def clear(self) -> None:
        """Drop every graph (their memory returns to the pool)."""
        self.steps.clear()

    def _key(self, rows: int) -> tuple:
        e = self.engine
        masks = e.adapters.mask_tensors
        return (rows, e._first, e.keys.shape[3], e.keys.data_ptr(), e.adapters.generation, e.adapters.mask_slots,
                tuple(m.shape for m in masks))  # fmt: skip

    def decode_hidden(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Hidden states ``(rows, hidden)`` of one decode step: tokens fed at ``positions`` (both ``(rows,)``)."""
        key = self._key(tokens.shape[0])
        step = self.steps.get(key)
        if step is None:
            step = self._record(key, tokens, positions)
        else:
            self.steps.move_to_end(key)
            step.tokens.copy_(tokens)
            step.positions.copy_(positions)
            for static, mask in zip(step.masks, self.engine.adapters.mask_tensors):
                static.copy_(mask)
        return step.run().clone()  # a later graph may reuse the output's pool memory

    def _record(self, key: tuple, tokens: Tensor, positions: Tensor) -> _Step:
        e = self.engine
        step = _Step(tokens.clone(), positions.clone(), [m.clone() for m in e.adapters.mask_tensors], lambda: None)
        span, first = e.keys.shape[3], e._first

        def static_step() -> Tensor:
            with e.adapters.masks_from(step.masks):
                hidden = e._extend_hidden(step.tokens[:, None], step.positions, span, first, causal_only=False)
            return hidden[:, 0]

        if not self.capture:
            step.run = static_step
        else:
            try:
                graph = self._capture(static_step, step)
            except RuntimeError as exc:  # a kernel that cannot be captured (replays' errors are not caught)
                raise GraphCaptureError(str(exc)) from exc

            def replay() -> Tensor:
                graph.replay()
                return step.out

            step.run = replay
        self.captures += 1
        self.steps[key] = step
        while len(self.steps) > self.limit:
            self.steps.popitem(last=False)
        return step

    def _capture(self, static_step: Callable[[], Tensor], step: _Step) -> torch.cuda.CUDAGraph:
        """Record ``static_step`` as a CUDA graph (its output lands in ``step.out``)."""
        # warm up on a side stream (lazy library handles), then record; the warm-up's key/value writes are the
        # same ones the first replay makes
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            static_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step.out = static_step()
        return graph
