"""Adapter arithmetic, rank resize and update diagnostics on PEFT-format folders.

`combine`, `resize_adapter` and `inspect_adapter`: the math lives in `lorakit.ops`; this module reads, validates,
builds the new configs and writes.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lorakit.config import LoraConfig, is_int
from lorakit.errors import ConfigError, IncompatibleAdapterError
from lorakit.hub import base_key
from lorakit.io.factor_files import AdapterFactors, read_factors, write_factors
from lorakit.ops import ALIASES, DENSITY_METHODS, METHODS, AdapterReport, LayerResize, combine_factors, diagnose
from lorakit.ops import resize as resize_factors
from lorakit.ops.factors import LayerFactors

AdapterLike = str | os.PathLike | AdapterFactors
MAJORITY_SIGNS = ("total", "frequency")


def _load(adapter: AdapterLike, rewrites: bool = False) -> AdapterFactors:
    loaded = adapter if isinstance(adapter, AdapterFactors) else read_factors(adapter)
    if rewrites and loaded.config.use_dora:
        raise ConfigError(
            f"{loaded.source} is a DoRA adapter (use_dora=True): its magnitude vector is not a low-rank factor, so "
            "combine/resize cannot rewrite it; merge it into the base with lorakit.merge / lorakit unload instead"
        )
    return loaded


def combine(
    adapters: Sequence[AdapterLike],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    out: str | os.PathLike | None = None,
    *,
    majority_sign: str = "total",
    seed: int = 0,
    check_base: bool = True,
) -> AdapterFactors:
    """Combine adapters into one new PEFT-format adapter (the formulas are in `lorakit.ops.combination`).

    Args:
        adapters: Adapter folders (or `AdapterFactors`, e.g. from `lorakit.io.factor_files.factors_of`).
        weights: One weight per adapter (may be negative); default 1.0 each.
        method: "linear" (exact weighted sum, rank = sum of ranks; alias "cat"), "svd" (that sum re-projected to
            ``rank``), "ties", "dare_linear", "dare_ties", "magnitude_prune" (on the full updates, then SVD to
            ``rank``; PEFT's names with "_svd" are accepted too).
        rank: Target rank of the SVD methods (default: the largest input rank, as PEFT).
        density: Fraction of entries kept by ties / dare_* / magnitude_prune, in (0, 1].
        out: Folder to write the result to (PEFT format; loads in lorakit and peft); None writes nothing.
        majority_sign: Sign election of ties / dare_ties: "total" or "frequency".
        seed: Seed of DARE's random drops (and of the random A rows of zero-padded directions).
        check_base: Refuse adapters whose ``base_model_name_or_path`` differ (when both are set).

    Returns:
        The combined adapter (config with scaling 1 on every layer, factors).

    Raises:
        ConfigError: bad weights, method, rank or density.
        IncompatibleAdapterError: different base models, or a layer with different shapes (named).
        FormatError: an input folder is missing or corrupt.
    """
    if isinstance(weights, (numbers.Number, str)):
        raise ConfigError(f"weights={weights!r} must be a list with one number per adapter")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    name = ALIASES.get(method, method) if isinstance(method, str) else method
    _check_combine_args(adapters, weights, name, rank, density, majority_sign)
    loaded = [_load(a, rewrites=True) for a in adapters]
    labels = [a.source or f"adapter {i}" for i, a in enumerate(loaded)]
    _check_mergeable(loaded, labels, check_base)
    layers = combine_factors(
        [a.layers for a in loaded], weights, name, rank, density or 1.0, majority_sign, seed, labels
    )
    result = AdapterFactors(combined_config(loaded[0].config, layers, loaded), layers, {}, "combined adapter")
    if out is not None:
        write_factors(out, result)
    return result


def _check_combine_args(adapters, weights, method, rank, density, majority_sign) -> None:
    problems = []
    if isinstance(adapters, (str, os.PathLike)) or not adapters:
        problems.append(f"adapters={adapters!r} must be a non-empty list of adapter folders")
    elif len(weights) != len(adapters):
        problems.append(f"got {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(_is_real(w) and math.isfinite(float(w)) for w in weights):
        problems.append(f"weights={weights!r} must be finite numbers")
    if method not in METHODS:
        problems.append(f"method={method!r} must be one of {list(METHODS)} (or PEFT's {sorted(ALIASES)})")
    if rank is not None and (not is_int(rank) or rank <= 0):
        problems.append(f"rank={rank!r} must be a positive integer")
    elif rank is not None and method == "linear":
        problems.append(
            "method='linear' is exact and its rank is the sum of the input ranks; use method='svd' "
            f"to re-project to rank={rank}"
        )
    if method in DENSITY_METHODS and density is None:
        problems.append(f"method={method!r} needs density (the fraction of entries kept, e.g. 0.5)")
    elif density is not None and method not in DENSITY_METHODS:
        problems.append(f"density only applies to {list(DENSITY_METHODS)}, not to method={method!r}")
    elif density is not None and (not _is_real(density) or not 0 < density <= 1):
        problems.append(f"density={density!r} must be a number in (0, 1]")
    if majority_sign not in MAJORITY_SIGNS:
        problems.append(f"majority_sign={majority_sign!r} must be one of {MAJORITY_SIGNS}")
    if problems:
        raise ConfigError("cannot combine: " + "; ".join(problems) + ".")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_mergeable(adapters: list[AdapterFactors], labels: list[str], check_base: bool) -> None:
    bases = {
        label: a.config.base_model_name_or_path.rstrip("/")
        for label, a in zip(labels, adapters)
        if a.config.base_model_name_or_path
    }
    if check_base and len({base_key(b) for b in bases.values()}) > 1:  # Org/Name and an alias of it agree
        raise IncompatibleAdapterError(
            f"the adapters were trained on different base models: {bases}. Combining them is meaningless; if they "
            "are the same model under two names, pass check_base=False (CLI: --ignore-base)."
        )
    extra = {label: sorted(a.extras)[:3] for label, a in zip(labels, adapters) if a.extras}
    if extra:
        raise IncompatibleAdapterError(
            f"combine handles LoRA factors only, but these adapters also hold other tensors "
            f"(modules_to_save copies or trained biases): {extra}. Combine adapters trained with bias='none' and "
            "without modules_to_save."
        )


def combined_config(template: LoraConfig, layers: dict[str, LayerFactors], inputs: list[AdapterFactors]) -> LoraConfig:
    """The config of a combined adapter: exact target paths, per-layer ranks, scaling 1 everywhere."""
    ranks = {p: f.rank for p, f in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    base = next((a.config.base_model_name_or_path for a in inputs if a.config.base_model_name_or_path), None)
    return dataclasses.replace(
        template,
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        target_modules=tuple(layers),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
        bias="none",
        init_lora_weights=True,
        base_model_name_or_path=base,
        inference_mode=True,
    )


@dataclass
class ResizeResult:
    """The resized adapter and, per layer, the ranks and the fraction of energy kept."""

    adapter: AdapterFactors
    layers: dict[str, LayerResize]

    @property
    def padded(self) -> list[str]:
        """Layers whose rank was below the target: zero-padded, their update unchanged."""
        return [p for p, r in self.layers.items() if r.padded]


def resize_adapter(
    adapter: AdapterLike, rank: int, out: str | os.PathLike | None = None, *, seed: int = 0
) -> ResizeResult:
    """Re-factorize every layer's ``scaling * B A`` to rank ``rank`` by truncated SVD (Eckart-Young optimal).

    ``lora_alpha`` (and ``alpha_pattern``, ``use_rslora``) are kept, so the new scaling is ``alpha / rank`` and
    the new factors absorb it. Resizing to the current rank is lossless (up to float rounding). A layer whose
    rank is below ``rank`` is zero-padded (B's new columns are 0, so the update is unchanged; A's new rows are
    random so the extra rank can still train) and a warning says so. Non-LoRA tensors are copied unchanged.

    Raises:
        ConfigError: ``rank`` is not a positive integer.
        FormatError: the adapter folder is missing or corrupt.
    """
    if not is_int(rank) or rank <= 0:
        raise ConfigError(f"rank={rank!r} must be a positive integer (the new LoRA rank, e.g. 8)")
    src = _load(adapter, rewrites=True)
    config = dataclasses.replace(src.config, r=int(rank), rank_pattern={})
    layers, report = resize_factors(src.layers, int(rank), config.scaling_for, seed)
    result = ResizeResult(AdapterFactors(config, layers, dict(src.extras), f"{src.source} resized to r={rank}"), report)
    if result.padded:
        warnings.warn(
            f"rank {rank} is above the current rank of {len(result.padded)} layer(s) (e.g. {result.padded[0]}, "
            f"r={report[result.padded[0]].rank_before}): they are zero-padded, which changes nothing until trained "
            "further; resizing cannot add information.",
            UserWarning,
            stacklevel=2,
        )
    if out is not None:
        write_factors(out, result.adapter)
    return result


def inspect_adapter(adapter: AdapterLike, model: nn.Module | None = None) -> AdapterReport:
    """Per-layer singular values of ``scaling * B A``, effective rank at 90% / 99% energy, and a verdict.

    Args:
        adapter: An adapter folder (or `AdapterFactors`).
        model: The base model (an ``nn.Module``, with or without adapters) for ``||dW||_F / ||W||_F``; optional.

    Raises:
        FormatError: the adapter folder is missing or corrupt.
        IncompatibleAdapterError: ``model`` lacks a layer of the adapter or its weight has another shape.
    """
    src = _load(adapter)
    norms = _base_norms(model, src) if model is not None else None
    return diagnose(src.layers, norms, src.source or "adapter")


def _base_norms(model: nn.Module, src: AdapterFactors) -> dict[str, float]:
    norms, problems = {}, []
    for path, f in src.layers.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path}: no such module")
            continue
        module = getattr(module, "base_layer", module)
        weight = module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight
        if tuple(weight.shape) != f.base_shape():
            problems.append(f"{path}: model weight {tuple(weight.shape)}, adapter expects {f.base_shape()}")
            continue
        norms[path] = float(weight.detach().float().norm())
    if problems:
        shown = "; ".join(problems[:6]) + (f" ... ({len(problems)} layers)" if len(problems) > 6 else "")
        raise IncompatibleAdapterError(
            f"{src.source!r} does not fit {type(model).__name__}: {shown}. Pass the base model it was trained on."
        )
    return norms
