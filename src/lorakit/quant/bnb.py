"""The optional bitsandbytes backend: ``bnb.nn.Linear4bit`` layers, recognised without importing bitsandbytes.

``Linear4bit`` is what CUDA users get from transformers' ``BitsAndBytesConfig(load_in_4bit=True)``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.quant.nf4 import BLOCK_SIZE, NF4Tensor, dequantize_nf4

BNB_EXTRA = "pip install bitsandbytes  (or: pip install 'lorakit[bnb]')"


def import_bnb() -> Any:
    """The ``bitsandbytes`` module, or an ImportError that names what to install.

    Imported by name at call time: bitsandbytes is optional and never needed by the torch backend.
    """
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ImportError(
            f"backend='bnb' needs bitsandbytes, which is not installed ({exc}); install it with: {BNB_EXTRA}. "
            "The default backend='torch' needs no extra package."
        ) from exc


def is_bnb_4bit(module: nn.Module) -> bool:
    """True for ``bitsandbytes.nn.Linear4bit`` and its subclasses (checked by class name: no import needed)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _plain_state(module: nn.Module) -> tuple[Tensor, Any]:
    """``(packed codes, quant_state)`` in bitsandbytes' standard layout (undoing its AVX512-BF16 CPU repacking)."""
    weight, state = module.weight, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        inverse = importlib.import_module("bitsandbytes.nn.modules")._convert_weight_packed_for_cpu_inverse
        return inverse(weight.data, state)
    return weight.data, state


def bnb_dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The dense ``(out, in)`` weight of an NF4 ``Linear4bit``, decoded by lorakit from bitsandbytes' codes.

    lorakit's decoder equals bitsandbytes' reference (torch) path bit for bit; its CPU kernel is not used here
    (see `to_bnb_linear4bit`).
    """
    packed, state = _plain_state(module)
    if state.quant_type != "nf4" or state.blocksize != BLOCK_SIZE:
        raise ConfigError(
            f"lorakit reads NF4 Linear4bit layers with block size {BLOCK_SIZE}; this one is {state.quant_type} "
            f"with block size {state.blocksize}"
        )
    if state.nested:
        q = NF4Tensor(
            packed.view(torch.uint8).reshape(-1),
            state.absmax,
            tuple(state.shape),
            absmax2=state.state2.absmax,
            offset=state.offset,
        )
    else:
        q = NF4Tensor(packed.view(torch.uint8).reshape(-1), state.absmax, tuple(state.shape))
    return dequantize_nf4(q, dtype or state.dtype)


def _check_bnb_kernel(layer: nn.Module) -> None:
    """Refuse a layer bitsandbytes itself dequantizes wrongly.

    bitsandbytes 0.50's CPU kernel assumes blocks never straddle rows: with ``in_features`` even but not a
    multiple of 64 (e.g. 32, 96) its outputs are far off (|error| ~1.6 vs 0.36 for unit-normal weights).
    """
    bnb = import_bnb()
    packed, state = _plain_state(layer)
    theirs = bnb.functional.dequantize_4bit(packed, state).float()
    ours = bnb_dequantized_weight(layer, torch.float32)
    if not torch.allclose(theirs, ours, rtol=1e-3, atol=1e-3 * ours.abs().max().item()):
        raise ConfigError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} dequantizes a ({layer.out_features}, "
            f"{layer.in_features}) NF4 weight wrongly on {packed.device.type} (max error "
            f"{(theirs - ours).abs().max().item():.3g}; its CPU kernel needs in_features divisible by {BLOCK_SIZE}); "
            "use backend='torch' (lorakit's NF4Linear, same codes) for this model"
        )


def to_bnb_linear4bit(
    linear: nn.Linear, *, double_quant: bool = True, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` NF4 copy of ``linear`` (block size 64) on the same device.

    Sets ``support_avx512bf16_for_cpu = False``: on CPUs with AVX512-BF16, bitsandbytes otherwise repacks the
    weight on the first eval-mode, no-grad forward, and gradients through the layer afterwards are wrong.
    """
    bnb = import_bnb()
    weight = linear.weight
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype or weight.dtype,
        compress_statistics=double_quant,
        quant_type="nf4",
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().to("cpu").clone(),
        requires_grad=False,
        compress_statistics=double_quant,
        quant_type="nf4",
        blocksize=BLOCK_SIZE,
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(weight.device if weight.device.type != "meta" else "cpu")  # quantizes here
    layer.support_avx512bf16_for_cpu = False
    _check_bnb_kernel(layer)
    layer.train(linear.training)
    return layer


def disable_cpu_repacking(model: nn.Module) -> int:
    """Set ``support_avx512bf16_for_cpu = False`` on every ``Linear4bit`` of ``model`` (e.g. loaded by transformers).

    Returns:
        How many layers were changed.
    """
    count = 0
    for module in model.modules():
        if is_bnb_4bit(module) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
