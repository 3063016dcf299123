"""Batching: length-grouped, seeded, resumable batch order and padding collation.

On CPU every padded token costs as much as a real one, so batches are drawn from groups of similar length:
shuffle, cut into mega-batches of ``group_size`` batches, sort each by length, cut into batches, shuffle the
batches. The order depends only on ``(seed, epoch)``, so a resumed run can recompute it and skip to its
position instead of storing it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from lorakit.training.data import IGNORE_INDEX, Example


def batch_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True, group_size: int = 50
) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch; deterministic in ``(seed, epoch)``.

    Args:
        lengths: Token count of every example.
        batch_size: Examples per batch; the last batch may be smaller.
        seed: Run seed.
        epoch: Epoch number (0-based); each epoch gets a different order.
        group_by_length: Group similar lengths to cut padding.
        group_size: Batches per length-sorted mega-batch (larger: less padding, less randomness).
    """
    rng = random.Random(f"{seed}:{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if not group_by_length:
        return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    mega = batch_size * group_size
    batches = []
    for start in range(0, len(idx), mega):
        chunk = sorted(idx[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def padded_tensors(rows: Sequence, pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels`` (batch, width) of rows with ``.input_ids`` / ``.labels``, right-padded.

    Padding is ``pad_id`` / ``IGNORE_INDEX``; this is the one place padded and packed batches are built.
    """
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.input_ids)] = torch.as_tensor(r.input_ids)
        labels[b, : len(r.labels)] = torch.as_tensor(r.labels)
    return ids, labels


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` and ``attention_mask`` (batch, seq) and ``labels`` (-100 on padding)."""
    n = max(len(e) for e in examples)
    n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    ids, labels = padded_tensors(examples, pad_id, n)
    mask = (torch.arange(n) < torch.tensor([len(e) for e in examples])[:, None]).long()  # (batch, seq)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (the first position never does)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
