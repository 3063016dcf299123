"""Frozen 4-bit base layers (QLoRA's NF4) behind a tiny interface; torch only, no LoRA logic here.

`quantize` swaps a model's block Linear layers for `NF4Linear` (or bitsandbytes' ``Linear4bit``); everything
else in lorakit sees a 4-bit layer through `is_quantized`, `dequantized_weight`, `compute_dtype_of` and the
``in_features`` / ``out_features`` attributes.
"""

from lorakit.quant.bnb import disable_cpu_repacking, is_bnb_4bit
from lorakit.quant.model import (
    compute_dtype_of,
    dequantized_weight,
    is_quantized,
    quantize,
    quantized_bytes,
    quantized_device,
)
from lorakit.quant.nf4 import BLOCK_SIZE, NF4_CODE, NF4Tensor, dequantize_nf4, quantize_nf4
from lorakit.quant.nf4_linear import NF4Linear

__all__ = [
    "BLOCK_SIZE",
    "NF4_CODE",
    "NF4Linear",
    "NF4Tensor",
    "compute_dtype_of",
    "dequantize_nf4",
    "dequantized_weight",
    "disable_cpu_repacking",
    "is_bnb_4bit",
    "is_quantized",
    "quantize",
    "quantize_nf4",
    "quantized_bytes",
    "quantized_device",
]
