"""Pure functions on adapter tensors (torch only, no model, no files): arithmetic, rank tools, diagnostics.

An adapter is a ``{layer_path: LayerFactors}`` dict; `lorakit.io.factor_files` reads and writes them as PEFT-format
folders and `lorakit.arith` holds the user-facing verbs (`combine`, `resize_adapter`, `inspect_adapter`).
"""

from lorakit.ops.combination import (
    ALIASES,
    DENSITY_METHODS,
    METHODS,
    combine_factors,
    combine_layer,
    disjoint_mean,
    magnitude_trim,
    random_drop,
)
from lorakit.ops.factors import LayerFactors, check_compatible, lowrank_svd
from lorakit.ops.rank import LayerResize, effective_rank, energy_kept, resize, singular_values
from lorakit.ops.spectrum import AdapterReport, LayerSpectrum, diagnose, layer_spectrum

__all__ = [
    "ALIASES",
    "DENSITY_METHODS",
    "METHODS",
    "AdapterReport",
    "LayerFactors",
    "LayerResize",
    "LayerSpectrum",
    "check_compatible",
    "combine_factors",
    "combine_layer",
    "diagnose",
    "disjoint_mean",
    "effective_rank",
    "energy_kept",
    "layer_spectrum",
    "lowrank_svd",
    "magnitude_trim",
    "random_drop",
    "resize",
    "singular_values",
]
