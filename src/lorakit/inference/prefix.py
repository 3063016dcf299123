"""A prompt-prefix KV cache per adapter: rows whose prompts start alike skip recomputing the shared start.

Chat prompts repeat their start (the template and the system prompt) across requests, and an eval repeats its
instruction. A key or value at position ``j`` depends only on tokens ``0..j`` and on the weights (causal
attention), so the keys and values a finished prefill computed for one prompt are valid, column for column, for
any later prompt that starts with the same tokens *under the same adapter* (an adapter on k/v changes them).

Entries are whole prompts' keys and values ``(layers, kv_heads, length, head_dim)``, least recently used first
out, within a byte budget. A lookup takes the longest common start with any entry of the row's adapter (any
length, no block rounding), leaving at least the prompt's last token to compute (its logits are the prefill's
result). An entry that another entry extends is dropped (the longer one serves both). Each entry keeps its
adapter's version (identity and version counters of its factors): the owner drops the entries of an adapter
that changed or went (`retain`), and clears the cache when base weights change.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Entry:
    adapter: str | None
    version: tuple  # the adapter's factor versions when computed (() for the base rows)
    tokens: tuple[int, ...]
    keys: Tensor  # (layers, kv_heads, len(tokens), head_dim)
    values: Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def common_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share.

    Bisects on slice equality (each comparison runs in C), so a lookup over many long prompts stays cheap on
    the prefill path: O(log n) slice comparisons instead of a Python loop over every token.
    """
    n = min(len(a), len(b))
    a, b = tuple(a[:n]), tuple(b[:n])
    if a == b:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Keys and values of earlier prompts, per adapter, within ``budget_bytes`` (0: the cache is off)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self.nbytes = 0
        self.hit_tokens = 0  # prompt tokens served from the cache since it was made (a counter for metrics)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def retain(self, versions: dict[str, tuple]) -> None:
        """Drop the entries of adapters whose factors are not at ``versions`` now (changed, or removed)."""
        for key, entry in list(self._entries.items()):
            if entry.adapter is not None and versions.get(entry.adapter) != entry.version:
                self.nbytes -= self._entries.pop(key).nbytes

    def match(self, adapter: str | None, prompt: Sequence[int]) -> tuple[int, Entry | None]:
        """The longest reusable start of ``prompt`` (at most ``len(prompt) - 1`` tokens) and its entry."""
        best, found = 0, None
        for key, entry in self._entries.items():
            if entry.adapter == adapter:
                n = min(common_start(entry.tokens, prompt), len(prompt) - 1)
                if n > best:
                    best, found = n, key
        if found is None:
            return 0, None
        self._entries.move_to_end(found)
        return best, self._entries[found]

    def add(self, adapter: str | None, version: tuple, prompt: Sequence[int], keys: Tensor, values: Tensor) -> None:
        """Keep ``prompt``'s keys and values (copied); entries it extends go, nothing goes in if one extends it."""
        tokens = tuple(prompt)
        if self.budget == 0 or 2 * keys.numel() * keys.element_size() > self.budget:
            return
        for key, entry in list(self._entries.items()):
            if entry.adapter != adapter:
                continue
            shared = common_start(entry.tokens, tokens)
            if shared == len(tokens):  # an entry already holds this prompt (and maybe more)
                self._entries.move_to_end(key)
                return
            if shared == len(entry.tokens):  # this prompt extends the entry: the entry is redundant
                self.nbytes -= self._entries.pop(key).nbytes
        entry = Entry(adapter, version, tokens, keys.clone(memory_format=torch.contiguous_format),
                      values.clone(memory_format=torch.contiguous_format))  # fmt: skip
        self._entries[self._next] = entry
        self._next += 1
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes
