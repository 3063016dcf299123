"""LoRA on a frozen 4-bit base (QLoRA): `LoraQuantLinear` wraps an `NF4Linear` or a bitsandbytes ``Linear4bit``.

The adapter math is `LoraLinear`'s (``y = base(x) + scaling * B(A(dropout(x)))``, A and B in full precision);
what differs is that the base has no dense, writable weight. Shapes come from ``in_features`` /
``out_features``, adapters are created in fp32 (or fp64) on the codes' device, and merging into the 4-bit
codes is refused: `lorakit.merge_quantized` writes a dequantized, re-quantized or original-precision model
and reports the drift.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.errors import MergeError
from lorakit.layers.base import LoraLayer
from lorakit.layers.linear import LoraLinear
from lorakit.quant import compute_dtype_of, dequantized_weight, quantized_device

MERGE_HINT = (
    "a 4-bit base cannot take the update in place; use lorakit.merge_quantized(model, mode=...) with mode "
    "'dequant' (dense bf16/fp32 model from dequantized W + BA, the default), 'nf4' (re-quantized) or "
    "'original' (BA added to the original high-precision model passed as merge_into=); CLI: "
    "`lorakit merge --quantized nf4 --mode dequant|nf4|original [--merge-into ORIGINAL]`"
)


class LoraQuantLinear(LoraLinear):
    """`LoraLinear` over a 4-bit base layer (see `lorakit.quant.is_quantized`).

    Args:
        base_layer: An `NF4Linear` or ``bitsandbytes.nn.Linear4bit``; kept as ``self.base_layer``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)  # shapes from in_features / out_features

    # The generic composition base(x) + sum of branches: the base runs its own 4-bit autograd function.
    forward = LoraLayer.forward

    @property
    def weight(self) -> Tensor:
        """A fresh dense copy of the base weight (dequantized; writing to it changes nothing)."""
        return dequantized_weight(self.base_layer)

    def adapter_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """fp32 adapters (fp64 for an fp64 compute dtype) on the device of the base's codes."""
        dtype = compute_dtype_of(self.base_layer)
        return (dtype if dtype == torch.float64 else torch.float32), quantized_device(self.base_layer)

    def merge(self, name: str) -> None:
        """Refused: see `lorakit.merge_quantized`."""
        self._require(name)
        raise MergeError(f"cannot merge adapter {name!r} into a 4-bit {type(self.base_layer).__name__}: {MERGE_HINT}")

    def unmerge(self, name: str | None = None) -> None:
        """Nothing is ever merged into a 4-bit base: a no-op for ``name=None``, an error for a named adapter."""
        if name is not None:
            raise MergeError(f"adapter {name!r} is not merged on {type(self.base_layer).__name__}; nothing to unmerge")
