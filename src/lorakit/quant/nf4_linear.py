"""`NF4Linear`: a frozen linear layer stored as NF4 codes, run through dequantize-then-matmul.

The autograd function saves only the packed codes and scales (never a dense weight, never the input: the base
is frozen, so backward needs just ``grad_input = grad_output @ W``, and W is dequantized again there). Peak
memory holds one dense weight at a time, the one being multiplied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import ConfigError
from lorakit.quant.nf4 import BLOCK_SIZE, NF4Tensor, dequantize_nf4, quantize_nf4

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _NF4Matmul(torch.autograd.Function):
    """``y = x @ dequant(q).T``; backward dequantizes again for the input gradient (the weight is frozen).

    Saved for backward: the packed codes and scales only (bytes, not a dense weight, and not ``x``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, spec: tuple, *stored: Tensor | None) -> Tensor:
        ctx.spec, ctx.x_dtype = spec, x.dtype
        ctx.save_for_backward(*stored)
        return F.linear(x, _dense(spec, stored))  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        stored = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # under autocast grad_out may be bf16/fp16: multiply in its dtype
            grad_x = (grad_out @ _dense(ctx.spec, stored).to(grad_out.dtype)).to(ctx.x_dtype)  # (..., in)
        return grad_x, None, *([None] * len(stored))


def _dense(spec: tuple, stored: tuple[Tensor | None, ...]) -> Tensor:
    shape, block_size, dtype = spec
    packed, absmax, absmax2, offset = stored
    return dequantize_nf4(NF4Tensor(packed, absmax, shape, absmax2, offset), dtype, block_size)


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` replacement holding NF4 codes (4 bits per weight) and per-block scales.

    Not an ``nn.Linear`` subclass: it has no dense ``weight``. LoRA wraps it through
    `lorakit.layers.LoraQuantLinear`, which reads `in_features`, `out_features`, `compute_dtype`, `device` and
    `dequantized_weight()`.

    Args:
        weight: The ``(out_features, in_features)`` weight to quantize.
        bias: Optional bias, kept in ``compute_dtype`` as a frozen parameter.
        double_quant: Quantize the absmax scales too (QLoRA's double quantization).
        compute_dtype: dtype of the dequantized weight and the matmul (default: the weight's dtype).
        block_size: Values per absmax (64).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        *,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ConfigError(f"NF4Linear needs a 2-D (out_features, in_features) weight; got {tuple(weight.shape)}")
        compute_dtype = compute_dtype or weight.dtype
        if compute_dtype not in _FLOATS:
            raise ConfigError(f"compute_dtype must be one of {list(_FLOATS)}; got {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self._set_quantized(quantize_nf4(weight, block_size, double_quant))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, double_quant: bool = True, compute_dtype: torch.dtype | None = None
    ) -> NF4Linear:
        """An NF4 copy of ``linear`` (on the same device); ``linear`` itself is not changed."""
        return cls(linear.weight, linear.bias, double_quant=double_quant, compute_dtype=compute_dtype)

    def _set_quantized(self, q: NF4Tensor) -> None:
        self.register_buffer("qweight", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax2", q.absmax2)
        self.register_buffer("absmax_offset", q.offset)

    @property
    def quantized(self) -> NF4Tensor:
        """The stored codes and scales as an `NF4Tensor`."""
        shape = (self.out_features, self.in_features)
        return NF4Tensor(self.qweight, self.absmax, shape, absmax2=self.absmax2, offset=self.absmax_offset)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh dense ``(out_features, in_features)`` weight in ``dtype`` (default: the compute dtype)."""
        return dequantize_nf4(self.quantized, dtype or self.compute_dtype, self.block_size)

    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes + scales; the bias is not counted)."""
        return self.quantized.nbytes()

    @torch.no_grad()
    def requantize_(self, weight: Tensor) -> None:
        """Replace the stored weight by NF4 codes of ``weight`` (same shape, block size and double quant)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ConfigError(
                f"requantize_ got shape {tuple(weight.shape)}; this layer is {(self.out_features, self.in_features)}"
            )
        self._set_quantized(quantize_nf4(weight.to(self.device), self.block_size, self.double_quant))

    def _apply(self, fn, recurse: bool = True):
        """Move or cast like any module, but never round the fp32 scales.

        ``.to(device)`` moves everything; ``.to(dtype)`` / ``.half()`` change the compute dtype and the bias;
        the scales stay fp32 (rounding them would change the weights).
        """
        scales = {k: t for k in ("absmax", "absmax2", "absmax_offset") if (t := self._buffers.get(k)) is not None}
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        super()._apply(fn, recurse)
        for key, old in scales.items():
            self._buffers[key] = old.to(self._buffers[key].device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def forward(self, x: Tensor) -> Tensor:
        spec = ((self.out_features, self.in_features), self.block_size, self.compute_dtype)
        stored = (self.qweight, self.absmax, self.absmax2, self.absmax_offset)
        out = _NF4Matmul.apply(x.to(self.compute_dtype), spec, *stored)  # (..., out_features)
        if self.bias is not None:
            out = out + self.bias  # outside the Function: a bias unfrozen by bias="all" still gets its gradient
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4, block_size={self.block_size}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )
