"""The running batch's KV cache: one transformers ``DynamicCache`` whose rows are left-padded to one length.

Why left padding in one cache (and not a cache per row): the decode step of every running request is one
forward pass over a ``(batch, 1)`` input, so the base weights are read once per step for the whole batch and
each row's adapter is applied by `lorakit.route`. Each row's prompt is prefilled alone (no padding, the same
shapes as a solo run), then its cache is spliced in: keys/values of padding columns are zeros and are masked out
of attention, and each row gets its own ``position_ids``, so a row computes exactly what it would alone up to
float summation order (a ~1e-6 logit difference; greedy tokens match unless two logits tie that closely).
Requests admitted together are prefilled in one left-padded pass the same way (a forward pass at small batch
costs about the same for 1 row as for 16: it is bound by reading the weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.errors import LorakitError


class BatchCache:
    """Key/value cache of the running rows plus each row's count of left-padding columns."""

    def __init__(self) -> None:
        self.cache = None  # a transformers DynamicCache, or None while no row runs
        self.pad: list[int] = []  # left-padding columns per row

    @property
    def rows(self) -> int:
        return len(self.pad)

    @property
    def length(self) -> int:
        return self.cache.layers[0].keys.shape[-2] if self.cache is not None else 0

    def add(self, row_cache, pad: list[int]) -> None:
        """Append the rows of a freshly prefilled cache (``pad[i]``: row i's left padding), padding the shorter side."""
        for layer in row_cache.layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise LorakitError(
                    f"{type(layer).__name__} cache layers (sliding window) cannot be batched by lorakit serve; "
                    "serve with --max-batch-size 1"
                )
        if self.cache is None:
            self.cache, self.pad = row_cache, list(pad)
            return
        total = max(self.length, row_cache.layers[0].keys.shape[-2])
        grow, new_pad = total - self.length, total - row_cache.layers[0].keys.shape[-2]
        for mine, theirs in zip(self.cache.layers, row_cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, grow), _left_pad(theirs.keys, new_pad)])
            mine.values = torch.cat([_left_pad(mine.values, grow), _left_pad(theirs.values, new_pad)])
        self.pad = [p + grow for p in self.pad] + [p + new_pad for p in pad]

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows ``indices`` (in that order) and drop padding columns no row needs any more."""
        if not indices:
            self.cache, self.pad = None, []
            return
        idx = torch.tensor(indices, device=self.cache.layers[0].keys.device)
        self.pad = [self.pad[i] for i in indices]
        trim = min(self.pad)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[..., trim:, :]  # (rows, heads, length, dim)
            layer.values = layer.values.index_select(0, idx)[..., trim:, :]
        self.pad = [p - trim for p in self.pad]

    def step_mask(self, device: torch.device) -> Tensor:
        """``(rows, length + 1)`` attention mask for one decode step: 0 on padding, 1 on real and new tokens."""
        cols = torch.arange(self.length + 1, device=device)
        return (cols[None, :] >= torch.tensor(self.pad, device=device)[:, None]).long()

    def truncate(self, length: int) -> None:
        """Drop columns past ``length`` (undo the part of a decode step that failed after some layers appended)."""
        if self.cache is None:
            return
        for layer in self.cache.layers:
            if layer.keys is not None and layer.keys.shape[-2] > length:
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

    @contextmanager
    def only_row(self, index: int) -> Iterator[None]:
        """Inside the block the cache holds row ``index`` alone (views; what a forward pass appends is discarded)."""
        saved = [(layer.keys, layer.values) for layer in self.cache.layers]
        pad = self.pad
        try:
            for layer, (keys, values) in zip(self.cache.layers, saved):
                layer.keys, layer.values = keys[index : index + 1], values[index : index + 1]
            self.pad = [pad[index]]
            yield
        finally:
            for layer, (keys, values) in zip(self.cache.layers, saved):
                layer.keys, layer.values = keys, values
            self.pad = pad


def _left_pad(t: Tensor, n: int) -> Tensor:
    return F.pad(t, (0, 0, n, 0)) if n else t  # (batch, heads, n + length, dim)
