"""Per-row adapters for the decode engine, kept separate from the base weights (never merged).

For the adapters present in a batch (``k`` of them, in first-appearance order) each projection keeps its
factors side by side: ``A_cat = [A_1^T | ... | A_k^T]`` ``(in, sum r)`` and ``B_cat`` = the row blocks
``scaling_i * B_i^T`` stacked ``(sum r, out)`` - the stacked factors of `lorakit.route`, without padding. One
step computes ``h = x A_cat`` for every row, zeroes the rank columns that belong to other rows' adapters, and adds
``h B_cat``: two dense matmuls per projection whatever the mix, and each row gets exactly its own
``scaling * B A x`` (the zeroed columns add exact zeros). With one adapter for all rows no mask is needed.

Zeroed columns add exact zeros only while every factor is finite (``0 * nan`` is nan): an adapter with a NaN or
Inf factor would spill into its batch-mates. Such an adapter contributes zeros here and is listed in ``broken``;
the engine gives its rows NaN logits, which is what they would compute alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lorakit.errors import MergeError
from lorakit.inference import native
from lorakit.layers.base import LoraLayer

NATIVE_ROWS = 64  # up to this many rows (decode steps) a CPU applies adapters with `native.lora`; more: two matmuls


class ProjectionAdapters:
    """The concatenated factors of one (possibly fused) projection for one ordered set of adapter names.

    A fused projection (q, k and v as one matmul) has several parts side by side in its output; each part's
    ``B`` goes in its own block of ``B_cat`` (zeros elsewhere), so the fused update equals the separate ones.

    Args:
        parts: ``(lora_layer or None, out_features)`` of each part, in output order.
        names: The batch's adapters in slot order; names a part lacks contribute no columns there.
    """

    def __init__(self, parts: Sequence[tuple[LoraLayer | None, int]], names: Sequence[str]) -> None:
        self.a: Tensor | None = None
        self.a_t: Tensor | None = None  # A_cat^T (R, in), for `native.lora` (CPU, a few rows)
        self.b: Tensor | None = None
        self.spans: dict[str, list[tuple[int, int]]] = {}
        self.broken: set[str] = set()  # adapters with a non-finite factor here (their blocks are zeros)
        a_parts, b_blocks, rank, col = [], [], 0, 0
        for layer, out_features in parts:
            for n in names:
                if layer is None or n not in layer.r:
                    continue
                if n in layer.merged_adapters:
                    raise MergeError(f"adapter {n!r} is merged into the base weights; unmerge it before routing rows")
                a, b = layer.factors(n)  # (r, in), (out, r)
                a, b = a.detach().float(), b.detach().float() * layer.scaling[n]
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    self.broken.add(n)
                    a, b = torch.zeros_like(a), torch.zeros_like(b)
                a_parts.append(a.T)  # (in, r)
                b_blocks.append((rank, col, b.T))  # (r, out_part)
                self.spans.setdefault(n, []).append((rank, rank + a.shape[0]))
                rank += a.shape[0]
            col += out_features
        if not a_parts:
            return
        self.a = torch.cat(a_parts, dim=1).contiguous()  # (in, R)
        self.b = self.a.new_zeros(rank, col)  # (R, out)
        for r0, c0, block in b_blocks:
            self.b[r0 : r0 + block.shape[0], c0 : c0 + block.shape[1]] = block
        self.single = len(self.spans) == 1
        if self.a.device.type == "cpu" and native.library() is not None:  # rows: lorakit's kernel reads A^T
            self.a_t = self.a.T.contiguous()  # (R, in)

    def column_mask(self, rows: Sequence[str | None], device: torch.device) -> Tensor | None:
        """``(rows, R)`` 1/0 mask of each row's own rank columns; None when every row uses all of them."""
        if self.a is None:
            return None
        if self.single and all(r in self.spans for r in rows):
            return None
        mask = torch.zeros(len(rows), self.a.shape[1])
        for i, name in enumerate(rows):
            for lo, hi in self.spans.get(name, ()):
                mask[i, lo:hi] = 1.0
        return mask.to(device)

    def add_to(self, y: Tensor, x: Tensor, mask: Tensor | None) -> Tensor:
        """``y + ((x A_cat) * mask) B_cat`` for ``x (n, in)``, ``y (n, out)``; in place on ``y``."""
        if self.a is None:
            return y
        if self.a_t is not None and x.shape[0] <= NATIVE_ROWS and _plain(x, y, mask):
            return native.lora(x, self.a_t, self.b, mask, y)  # only each row's own rank columns
        h = x @ self.a  # (n, R)
        if mask is not None:
            h = h * mask
        return y.addmm_(h, self.b)  # (n, out)


def _plain(*tensors: Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.is_contiguous()) for t in tensors)


def layer_version(layer: LoraLayer | None) -> tuple:
    """Identity and version counters of ``layer``'s factors: changes when an adapter is added, removed or trained."""
    if layer is None:
        return ()
    key: list = []
    for n in layer.r:
        a, b = layer.factors(n)
        key.append((n, id(a), a._version, id(b), b._version, layer.scaling[n]))
    return tuple(key)


def adapter_versions(layers: Sequence[LoraLayer | None]) -> dict[str, tuple]:
    """Per adapter name, the identity and version counters of its factors across ``layers`` (Nones skipped)."""
    out: dict[str, list] = {}
    for layer in layers:
        for n, *version in layer_version(layer):
            out.setdefault(n, []).append(tuple(version))
    return {n: tuple(v) for n, v in out.items()}
