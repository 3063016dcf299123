"""The decode engine's view of the model's adapters and base weights, kept in step with the model.

The engine packs the base weights once and stacks the batch's adapter factors per projection
(`lorakit.inference.adapters`). The model can change between steps: an adapter loaded, deleted or trained, a merge
into the base weights. `BatchAdapters.sync` notices each of these from tensor identities and version counters
(cheap when nothing changed) and redoes only what is stale; it also keeps the prefix cache honest (an adapter's
entries go when its factors change, all of them when base weights change) and counts an ``epoch`` so rows
prefilled before a change are never offered to the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.inference import llama
from lorakit.inference.adapters import ProjectionAdapters, adapter_versions, layer_version
from lorakit.inference.prefix import PrefixCache
from lorakit.layers.base import LoraLayer


class BatchAdapters:
    """Stacked factors and rank-column masks of the batch's adapters, for every block of an engine.

    Args:
        model: The model the engine runs (read, never changed).
        blocks: The engine's packed blocks (their ``proj``, ``adapters`` and ``masks`` are updated in place).
        fmt: The engine's base weight format (for re-packing).
        prefix: The engine's prefix cache.

    Attributes:
        broken: Adapters with non-finite factors: their rows get NaN logits (`lorakit.inference.adapters`).
        versions: Per adapter name, its factors' identities and version counters (what cache entries carry).
        epoch: Bumped whenever any adapter's factors or any base weight changed.
        generation: Bumped whenever the blocks' packed weights or stacked factors are replaced (a captured decode
            step holds their addresses: `lorakit.inference.graphs`).
        mask_tensors: The current rows' distinct rank-column masks (projections with one column layout share one).
        mask_slots: Per block and projection, the index of its mask in ``mask_tensors`` (None: no mask).
    """

    def __init__(self, model: nn.Module, blocks: list[llama.Block], fmt: str, prefix: PrefixCache) -> None:
        self.model, self.blocks, self.fmt, self.prefix = model, blocks, fmt, prefix
        self.device = next(model.parameters()).device
        self.broken: set[str] = set()
        self.versions: dict[str, tuple] = {}
        self.epoch = self.generation = 0
        self.mask_tensors: list[Tensor] = []
        self.mask_slots: tuple[int | None, ...] = ()
        self._factors_key: tuple | None = None  # every adapter's factor versions at the last sync
        self._adapter_key: tuple | None = None  # ... and the batch's adapter names
        self._mask_key: tuple | None = None

    def _lora(self, block: llama.Block, key: str) -> list[tuple[LoraLayer | None, int]]:
        layer = self.model.get_submodule(block.path)
        mods = [layer.get_submodule(p) for p in llama.FUSED[key]]
        return [(m if isinstance(m, LoraLayer) else None, llama.base_weight(m)[0].shape[0]) for m in mods]

    def repack_stale(self) -> None:
        """Re-pack projections whose base weights changed in place since packing (a merge, say)."""
        for block in self.blocks:
            layer = self.model.get_submodule(block.path)
            for key, parts in llama.FUSED.items():
                mods = [layer.get_submodule(p) for p in parts]
                versions = llama.weight_versions(mods)
                if versions != block.versions[key]:
                    block.proj[key], block.versions[key] = llama.fuse(mods, self.fmt), versions
                    self.prefix.clear()  # its keys and values came from the old weights
                    self.epoch += 1
                    self.generation += 1

    def sync(self, rows: Sequence[str | None]) -> None:
        """Rebuild the per-projection factors if the rows' adapters or any factor changed; re-pack changed bases.

        Raises:
            ConfigError: The model now holds an adapter the engine cannot apply (an embedding adapter, DoRA).
        """
        self.repack_stale()
        names = tuple(n for n in dict.fromkeys(rows) if n is not None)
        loras = {(b.path, k): self._lora(b, k) for b in self.blocks for k in llama.FUSED}
        key = (names, tuple(layer_version(lay) for parts in loras.values() for lay, _ in parts))
        if key[1] != self._factors_key:  # an adapter was added, removed, trained or rescaled: its entries go
            self.versions = adapter_versions([lay for parts in loras.values() for lay, _ in parts])
            self.prefix.retain(self.versions)
            self._factors_key, self.epoch = key[1], self.epoch + 1
        if key == self._adapter_key:
            return
        reason = llama.unsupported_reason(self.model)  # e.g. an adapter on the embedding was loaded since
        if reason is not None:
            raise ConfigError(f"the fast decode path cannot apply this model's adapters: {reason}")
        self.broken = set()
        for block in self.blocks:
            for k in llama.FUSED:
                block.adapters[k] = ProjectionAdapters(loras[(block.path, k)], names)
                self.broken |= block.adapters[k].broken
        self._adapter_key, self._mask_key = key, None
        self.generation += 1

    def set_masks(self, rows: Sequence[str | None], repeat: int = 1) -> None:
        """Point every projection at the rank-column masks of ``rows`` (each repeated for ``repeat`` tokens)."""
        key = (self._adapter_key, tuple(rows), repeat)
        if key == self._mask_key:
            return
        shared: dict = {}  # projections with the same column layout share one mask
        tensors: list[Tensor] = []
        slots: list[int | None] = []
        for block in self.blocks:
            for k, adapters in block.adapters.items():
                layout = tuple(sorted((n, tuple(s)) for n, s in adapters.spans.items()))
                if layout not in shared:
                    mask = adapters.column_mask(rows, self.device)
                    shared[layout] = None if mask is None else len(tensors)
                    if mask is not None:
                        tensors.append(mask.repeat_interleave(repeat, 0))
                slot = shared[layout]
                block.masks[k] = None if slot is None else tensors[slot]
                slots.append(slot)
        self.mask_tensors, self.mask_slots, self._mask_key = tensors, tuple(slots), key

    @contextmanager
    def masks_from(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """Inside the block every projection reads its mask from ``tensors`` (laid out as `mask_tensors`)."""
        saved = [dict(block.masks) for block in self.blocks]
        slots = iter(self.mask_slots)
        for block in self.blocks:
            for k in block.adapters:
                slot = next(slots)
                block.masks[k] = None if slot is None else tensors[slot]
        try:
            yield
        finally:
            for block, masks in zip(self.blocks, saved):
                block.masks = masks
