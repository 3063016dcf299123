"""The facts about an adapter that decide whether a runtime serves it: read from its files (and its base)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from lorakit.export.adapter_files import AdapterFiles
from lorakit.export.base_info import BaseInfo

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class AdapterFacts:
    """What runtime rules look at.

    Attributes:
        name: the adapter folder's name (used in suggested commands).
        path: the adapter folder as given.
        base: ``base_model_name_or_path`` from the config ("BASE" when missing).
        r: the config's ``r``.
        lora_alpha: the config's ``lora_alpha``.
        max_rank: the largest rank among the tensors.
        targets: leaf names of the adapted modules (``q_proj``, ...).
        modules: full module paths.
        use_dora / use_rslora / bias / lora_bias: the config's values.
        modules_to_save: the config's list (empty when none).
        rank_pattern / alpha_pattern: the config's per-module overrides.
        extra_tensors: tensor keys that are not LoRA factors.
        partial_targets: leaf names adapted in some layers but not in all of them.
        base_info: the base model's GGUF facts, when the base could be resolved.
    """

    name: str
    path: str
    base: str
    r: int
    lora_alpha: float
    max_rank: int
    targets: frozenset[str]
    modules: tuple[str, ...]
    use_dora: bool
    use_rslora: bool
    bias: str
    lora_bias: bool
    modules_to_save: tuple[str, ...]
    rank_pattern: dict
    alpha_pattern: dict
    extra_tensors: tuple[str, ...]
    partial_targets: frozenset[str]
    base_info: BaseInfo | None


def adapter_facts(files: AdapterFiles, base_info: BaseInfo | None = None, path: str | None = None) -> AdapterFacts:
    """Collects `AdapterFacts` from an adapter read with `read_adapter_files`."""
    cfg = files.config
    modules = tuple(files.modules)
    return AdapterFacts(
        name=files.path.resolve().name,
        path=path or str(files.path),
        base=str(cfg.get("base_model_name_or_path") or "BASE"),
        r=int(cfg.get("r", 8)),
        lora_alpha=float(cfg.get("lora_alpha", 8)),
        max_rank=files.max_rank,
        targets=frozenset(m.rsplit(".", 1)[-1] for m in modules),
        modules=modules,
        use_dora=bool(cfg.get("use_dora")),
        use_rslora=bool(cfg.get("use_rslora")),
        bias=str(cfg.get("bias") or "none"),
        lora_bias=bool(cfg.get("lora_bias")),
        modules_to_save=tuple(cfg.get("modules_to_save") or ()),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        extra_tensors=tuple(sorted(files.extra)),
        partial_targets=_partial_targets(modules, base_info),
        base_info=base_info,
    )


def _partial_targets(modules: tuple[str, ...], base_info: BaseInfo | None) -> frozenset[str]:
    layers: dict[str, set[int]] = defaultdict(set)
    for module in modules:
        found = _LAYER.search(module)
        if found:
            layers[module.rsplit(".", 1)[-1]].add(int(found.group(1)))
    if not layers:
        return frozenset()
    n_layer = base_info.n_layer if base_info else max(max(s) for s in layers.values()) + 1
    return frozenset(leaf for leaf, seen in layers.items() if len(seen) < n_layer)
