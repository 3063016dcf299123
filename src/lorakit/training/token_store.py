"""Tokenized examples on disk: two flat int32 files (token ids, labels), memory-mapped for reading.

A Python list holds each token as an 8-byte pointer to a 28-byte int: a million examples of 500 tokens would
take tens of GB. `tokenize_rows` writes each example to disk as it is tokenized instead, and `TokenStore` reads
an example back (as lists, for collation) only when a batch needs it; what stays in memory is one 8-byte offset
per example. The files live in a temporary folder (``$TMPDIR``; point it at a disk for very large data) that is
removed with the store.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import DataError
from lorakit.training.data import IGNORE_INDEX, Example, Row, TokenizeStats, tokenize

__all__ = ["TokenStore", "lengths_of", "tokenize_rows"]


class TokenStore(Sequence[Example]):
    """Examples appended once (`append`, then `close`), then read by index.

    Args:
        folder: Where the files go; default: a new temporary folder, removed when the store is.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        owned = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="lorakit-tokens-") if owned else folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if owned:
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        self.offsets = array("q", [0])  # example k is tokens offsets[k]:offsets[k + 1]
        self._writers = [open(self.folder / name, "wb") for name in ("input_ids.i32", "labels.i32")]  # noqa: SIM115
        self._maps: list[np.ndarray] | None = None
        self._lengths: np.ndarray | None = None

    def append(self, input_ids: Sequence[int], labels: Sequence[int]) -> None:
        """Write one example (ids and labels of the same length)."""
        for f, values in zip(self._writers, (input_ids, labels)):
            f.write(array("i", values).tobytes())
        self.offsets.append(self.offsets[-1] + len(input_ids))

    def close(self) -> TokenStore:
        """Finish writing and map the files for reading; returns the store."""
        for f in self._writers:
            f.close()
        self._writers = []
        total = self.offsets[-1]
        self._maps = [
            np.memmap(self.folder / name, dtype=np.int32, mode="r", shape=(total,)) if total else np.zeros(0, np.int32)
            for name in ("input_ids.i32", "labels.i32")
        ]
        self._lengths = np.diff(np.frombuffer(self.offsets, dtype=np.int64))
        return self

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example, shape (n,)."""
        if self._lengths is None:
            raise RuntimeError("TokenStore is still being written; call close() first")
        return self._lengths

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        if self._maps is None:
            raise RuntimeError("TokenStore is still being written; call close() first")
        if k < 0:
            k += len(self)
        a, b = self.offsets[k], self.offsets[k + 1]
        ids, labels = self._maps
        return Example(ids[a:b].tolist(), labels[a:b].tolist(), f"example {k}")

    def __iter__(self) -> Iterator[Example]:
        return (self[k] for k in range(len(self)))


def lengths_of(examples: Sequence[Any]) -> Sequence[int]:
    """Token counts of ``examples`` without reading them back when the sequence knows them (``.lengths``)."""
    lengths = getattr(examples, "lengths", None)
    return lengths if lengths is not None else [len(e) for e in examples]


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    max_length: int,
    mask_prompt: bool = True,
    chat_template: bool = True,
    folder: str | Path | None = None,
) -> tuple[TokenStore, TokenizeStats]:
    """Tokenize rows one at a time into a `TokenStore`; truncation and label-less examples are counted, never raised.

    Args:
        rows: The rows (a list or lazy rows: each is read once).
        tokenizer: A fast tokenizer (offsets are needed for the loss mask).
        max_length: Examples are truncated to this many tokens.
        mask_prompt: Take no loss on prompt tokens (see `lorakit.training.data.tokenize`).
        chat_template: Render prompt/completion rows with the tokenizer's chat template.
        folder: Where the token files go (default: a temporary folder).

    Raises:
        DataError: No example has a token to learn.
    """
    stats = TokenizeStats(total=len(rows))
    store = TokenStore(folder)
    for row in rows:
        ex, truncated = tokenize(row, tokenizer, max_length, mask_prompt, chat_template)
        stats.truncated += truncated
        if all(label == IGNORE_INDEX for label in ex.labels):
            stats.dropped_no_labels.append(row.source)
            continue
        store.append(ex.input_ids, ex.labels)
    store.close()
    stats.warn(max_length)
    if not len(store):
        raise DataError(
            f"none of the {len(rows)} examples has a token to learn within max_length={max_length}; raise --max-length."
        )
    return store, stats
