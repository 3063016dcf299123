"""Packing: several tokenized examples per ``max_length`` row, each attending only to itself.

Padding a batch of very different lengths to its longest row spends most of the compute on pad tokens.
Packing concatenates examples into rows of at most ``max_length`` tokens (best-fit decreasing: each example,
longest first, goes into the fullest row it still fits) and keeps them independent:

* ``position_ids`` restart at 0 for every example, so rotary/learned positions are those of the example alone;
* no 2-D ``attention_mask`` is passed (and no KV cache is made): from the restarting positions Hugging Face
  models build a block-diagonal causal mask (eager / SDPA) or run the attention kernel's variable-length path
  (FlashAttention 2), so no token sees another example;
* the label of each example's first token is ``IGNORE_INDEX``, so no example is trained to predict the first
  token of the next one (unpacked, that token is never a target either: nothing precedes it).

A packed micro-batch therefore has the same learned tokens, the same logits at them and so the same summed loss
and gradients as the same examples padded (tested to 1e-5 in fp32). The tail of a row that no example fills is
padding: its own segment (positions restarting), ``IGNORE_INDEX`` labels.

`pack` decides the rows from the examples' lengths alone; `PackedRows` concatenates a row when a batch reads it,
so packing keeps no second copy of the tokens (they stay in the on-disk token store).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorakit.errors import ConfigError
from lorakit.training.collate import padded_tensors
from lorakit.training.data import IGNORE_INDEX, Example
from lorakit.training.token_store import lengths_of


@dataclass
class PackedRow:
    """Examples concatenated into one row; ``seq_lens`` are their lengths, in order."""

    input_ids: list[int]
    labels: list[int]
    seq_lens: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    def without_labels(self) -> PackedRow:
        """The same tokens with no loss anywhere (the filler row of an empty shard)."""
        return PackedRow(self.input_ids, [IGNORE_INDEX] * len(self), self.seq_lens, self.source)


class PackedRows(Sequence[PackedRow]):
    """Packed rows, each concatenated from ``examples`` when it is read (nothing is copied up front).

    Row ``b`` holds the examples ``members[starts[b]:starts[b + 1]]``, longest first.
    """

    def __init__(self, examples: Sequence[Example], members: np.ndarray, starts: np.ndarray) -> None:
        self.examples, self.members, self.starts = examples, members, starts
        lengths = np.asarray(lengths_of(examples), dtype=np.int64)[members]
        self.lengths = np.add.reduceat(lengths, starts[:-1]) if len(members) else np.zeros(0, np.int64)  # per row

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, b):  # type: ignore[override]
        if isinstance(b, slice):
            return [self[i] for i in range(len(self))[b]]
        if b < 0:
            b += len(self)
        parts = [self.examples[int(i)] for i in self.members[self.starts[b] : self.starts[b + 1]]]
        ids: list[int] = []
        labels: list[int] = []
        for e in parts:
            ids += e.input_ids
            labels += [IGNORE_INDEX] + list(e.labels[1:])  # the first token of an example is never a target
        return PackedRow(ids, labels, [len(e) for e in parts], parts[0].source)

    def __iter__(self) -> Iterator[PackedRow]:
        return (self[b] for b in range(len(self)))


def pack(examples: Sequence[Example], max_length: int) -> PackedRows:
    """Pack examples into rows of at most ``max_length`` tokens, best-fit decreasing (deterministic).

    Only the lengths are read (`lengths_of`); the rows are concatenated when used.

    Args:
        examples: Tokenized examples, each at most ``max_length`` tokens (tokenization truncates).
        max_length: Tokens per packed row.

    Returns:
        The packed rows, fullest first; every example appears in exactly one row.
    """
    lengths = np.asarray(lengths_of(examples), dtype=np.int64)
    if len(lengths) and lengths.max() > max_length:
        i = int(lengths.argmax())
        raise ValueError(f"example {i} has {lengths[i]} tokens > max_length={max_length}")
    order = np.argsort(-lengths, kind="stable")  # longest first, ties by index
    bin_of = np.empty(len(lengths), dtype=np.int64)
    n_bins = 0
    free: list[tuple[int, int]] = []  # (free tokens, bin), sorted: the best fit is the first with room enough
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b, n_bins = max_length, n_bins, n_bins + 1
        bin_of[i] = b
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    members = order[np.argsort(bin_of[order], kind="stable")]  # by row, longest first within a row
    starts = np.concatenate([[0], np.cumsum(np.bincount(bin_of, minlength=n_bins))])
    return PackedRows(examples, members, starts)


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` and ``position_ids`` (batch, seq); no ``attention_mask`` (see the module doc).

    Rows are right-padded to the longest; the padding is a segment of its own with ignored labels.
    """
    n = max(len(r) for r in rows)
    ids, labels = padded_tensors(rows, pad_id, n)
    positions = torch.zeros((len(rows), n), dtype=torch.long)
    for b, r in enumerate(rows):
        segs = list(r.seq_lens) + ([n - len(r)] if n > len(r) else [])
        positions[b] = torch.cat([torch.arange(s) for s in segs])
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def padding_waste(lengths: Sequence[int], rows: Sequence[Sequence[int]]) -> float:
    """Share of the tokens in padded batches that are padding: ``rows`` lists each batch's example lengths."""
    computed = sum(max(r) * len(r) for r in rows)
    return 1.0 - sum(lengths) / computed if computed else 0.0


def check_packing_support(model: torch.nn.Module) -> None:
    """Raise unless ``model`` confines attention to each packed example.

    That takes a Hugging Face model and a transformers whose masks follow restarting ``position_ids``.

    Raises:
        ConfigError: The model or the installed transformers cannot run packed rows exactly.
    """
    try:
        from transformers import masking_utils
    except ImportError as e:
        raise ConfigError("--packing needs transformers >= 4.53 (masks from restarting position_ids).") from e
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise ConfigError("--packing needs transformers >= 4.53 (masks from restarting position_ids); upgrade it.")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder"):
        raise ConfigError(f"--packing needs a Hugging Face causal LM; {type(model).__name__} is not one.")
