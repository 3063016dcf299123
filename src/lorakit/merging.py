"""Merging verbs: fold adapters into the base weights and back, bypass them, or unload lorakit entirely.

Every verb is explicit and all-or-nothing; nothing merges inside ``train()``, ``eval()`` or ``forward()``.
Merged updates are computed in fp32 and cast once (`LoraLayer.merge`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lorakit.adapters import active_adapters
from lorakit.errors import MergeError
from lorakit.inject import replace_wrappers
from lorakit.layers import LoraLayer, iter_lora_layers
from lorakit.model_state import forget, require_loaded, state_of, wrappers


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter is bypassed (merged ones are unmerged) until the block exits."""
    found = list(wrappers(model))
    merged = {id(w): list(w.merged_adapters) for w in found if isinstance(w, LoraLayer)}
    flags = {id(w): w.disable_adapters for w in found}
    try:
        for w in found:
            if isinstance(w, LoraLayer):
                w.unmerge()
            w.disable_adapters = True
        yield model
    finally:
        for w in found:
            w.disable_adapters = flags[id(w)]
            for n in merged.get(id(w), []):
                w.merge(n)


def merge(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Add the updates of ``names`` (default: the active adapters) into the base weights; idempotent."""
    names = active_adapters(model) if names is None else [names] if isinstance(names, str) else list(names)
    require_loaded(model, names)
    inactive = [n for n in names if n not in active_adapters(model)]
    if inactive:
        raise MergeError(f"adapters {inactive} are not active; set_adapter(model, {names!r}) before merging them")
    _merge_layers(model, names)


def _merge_layers(model: nn.Module, names: Sequence[str]) -> None:
    """Merge ``names`` on every layer, all or nothing: a failure unmerges what this call merged."""
    _check_untied(model, names)
    done: list[tuple[LoraLayer, str]] = []
    for path, layer in iter_lora_layers(model):
        for n in names:
            if n not in layer.r or n in layer.merged_adapters:
                continue
            try:
                layer.merge(n)
            except MergeError as exc:
                for merged_layer, merged_name in reversed(done):
                    merged_layer.unmerge(merged_name)
                raise MergeError(f"{path}: {exc}; nothing was merged") from exc
            done.append((layer, n))


def _check_untied(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse to merge into a weight another module shares (tied embeddings): the update would change both."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    tied = [
        f"{path} (shares its weight with {[o for o in owners[id(layer.weight)] if not o.startswith(path + '.')]})"
        for path, layer in iter_lora_layers(model)
        if len(owners.get(id(layer.weight), ())) > 1
        and any(n in layer.r and n not in layer.merged_adapters for n in names)
    ]
    if tied:
        raise MergeError(
            f"cannot merge {list(names)} into tied weights: {'; '.join(tied)}; merging would also change the other "
            "module (e.g. tied input/output embeddings). Keep the adapter unmerged, or untie the weights first "
            "(e.g. load the model with tie_word_embeddings=False)"
        )


def unmerge(model: nn.Module) -> None:
    """Subtract every merged update from the base weights again (no-op when nothing is merged)."""
    for wrapper in wrappers(model):
        if isinstance(wrapper, LoraLayer):
            wrapper.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every wrapper by the original module class and forget all adapters.

    Args:
        model: The model with adapters.
        merge: Fold the active adapters into the weights (and keep trained ``modules_to_save`` copies); with
            False the untouched base model comes back.

    Returns:
        ``model`` itself, now a plain model (e.g. a transformers model whose ``save_pretrained`` output loads
        without lorakit).
    """
    state = state_of(model)
    if merge:
        _merge_layers(model, state.active)  # all or nothing, before any wrapper is replaced
    replace_wrappers(model, merge=merge)
    forget(model)
    return model
