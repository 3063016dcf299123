"""Frozen base weights in the format inference reads fastest: fp32, bf16, int8 weight-only, 4-bit.

Decode at batch 1 reads every weight once per token, so its speed follows the bytes per weight. The formats:

- ``fp32``: the model's own tensor, shared (no copy); exact.
- ``fp16``: an fp16 copy with fp32 activations and fp32 accumulation: only the weights are rounded (10-bit mantissa,
  8x finer than bf16's). On x86 CPUs it runs FBGEMM's fp16-weight GEMM (``quantized.linear_dynamic_fp16``: the
  activations are NOT quantized, each row is computed on its own), which converts weights on the fly: half the
  bytes of fp32 and no bf16 casts (speed: the README's decode table). On CUDA it is a plain fp16 matmul.
  Elsewhere (a CPU without FBGEMM) the fp16-rounded weight is kept widened to fp32, once: the same numbers, with
  fp32's bytes and speed (``nbytes`` says so). Weights beyond fp16's range (65504) are refused.
- ``bf16``: a bf16 copy; activations are cast to bf16 for the matmul and the result back to fp32.
- ``int8``: symmetric per-output-channel int8 (``w ~ q * scale``): a quarter of fp32's bytes. On x86 CPUs with
  AVX2 and a C compiler it runs lorakit's own kernel (`lorakit.inference.native`: fp32 activations, fp32
  accumulation, only the weights rounded); elsewhere PyTorch's weight-only kernel (``torch._weight_int8pack_mm``)
  with bf16 activations (its fp32 path is ~5x slower on AVX2).
- ``int4``: asymmetric 4-bit in groups of 32 input columns (``w ~ (q - 8) * scale + zero``), packed for PyTorch's
  CPU kernel (``torch._weight_int4pack_mm_for_cpu``): an eighth of fp32's bytes plus the group scales.
- ``nf4``: lorakit's NF4 (`lorakit.quant.nf4`, the QLoRA format) dequantized on every call; the smallest resident
  base (0.56 bytes per weight) but the slowest step, for memory-bound deployments.

Only the frozen base is converted; adapters stay in fp32 (`lorakit.inference.adapters`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.errors import ConfigError
from lorakit.inference.native import Int8Weight, library

WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "nf4")
INT4_GROUP = 32


class PackedWeight:
    """One linear map's frozen weight ``(out, in)`` (and bias) in one of `WEIGHT_FORMATS`; ``self(x)`` applies it.

    Args:
        weight: The fp32 (or bf16/fp16) weight ``(out, in)``; kept as is for ``fp32``, otherwise converted once.
        bias: Optional bias ``(out,)``, always applied in fp32.
        fmt: One of `WEIGHT_FORMATS`.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: str) -> None:
        if fmt not in WEIGHT_FORMATS:
            raise ConfigError(f"weight format {fmt!r} is not one of {WEIGHT_FORMATS}")
        self.fmt, self.bias = fmt, None if bias is None else bias.detach().float()
        self.native: Int8Weight | None = None  # int8 on a CPU that builds lorakit's kernel
        self.out_features, self.in_features = weight.shape
        w = weight.detach()
        if fmt == "fp32":
            self.w = w if w.dtype == torch.float32 else w.float()
        elif fmt == "fp16":
            if w.numel() and float(w.abs().max()) > torch.finfo(torch.float16).max:
                raise ConfigError(f"weight of shape {tuple(w.shape)} has values beyond fp16's range (65504); "
                                  "use weights='bf16' or 'fp32'")  # fmt: skip
            self.w = w.to(torch.float16)
            self.packed = _fbgemm_fp16(self.w, self.bias) if w.device.type == "cpu" else None
            if self.packed is not None:
                self.w = torch.empty(0, dtype=torch.float16)  # FBGEMM holds the only copy
            elif w.device.type == "cpu":
                self.w = self.w.float()  # no fp16 GEMM here: widen once, not on every call
        elif fmt == "bf16":
            self.w = w.to(torch.bfloat16)
        elif fmt == "int8":
            self.w, scale = quantize_int8(w.float())
            self.native = Int8Weight(self.w, scale, self.bias) if w.device.type == "cpu" and library() else None
            if self.native is not None:
                self.w = torch.empty(0, dtype=torch.int8)  # the packed copy is the only one
            else:
                self.scale = scale.to(torch.bfloat16)  # PyTorch's vectorized path takes bf16 (5x fp32's speed)
        elif fmt == "int4":
            self.w, self.scale = pack_int4(w.float())
        else:
            from lorakit.quant.nf4 import quantize_nf4

            self.w = quantize_nf4(w.float(), double_quant=False)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the weight (and its scales)."""
        if self.fmt == "nf4":
            return self.w.nbytes()
        if self.fmt == "fp16":
            return self.out_features * self.in_features * (2 if self.packed is not None or self.w.is_cuda else 4)
        if self.fmt == "int8" and self.native is not None:
            return self.native.nbytes
        tensors = [self.w, getattr(self, "scale", None)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __call__(self, x: Tensor) -> Tensor:
        """``x @ W^T + b`` for ``x (n, in)`` fp32, returning ``(n, out)`` fp32."""
        if self.fmt == "fp32":
            y = F.linear(x, self.w)
        elif self.fmt == "fp16":
            if self.packed is not None:  # bias applied inside
                return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
            y = F.linear(x.half(), self.w).float() if x.is_cuda else F.linear(x, self.w)
        elif self.fmt == "bf16":
            y = F.linear(x.to(torch.bfloat16), self.w).float()
        elif self.fmt == "int8":
            if self.native is not None:  # bias applied inside
                return self.native(x)
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.w, self.scale).float()  # (n, out)
        elif self.fmt == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.w, INT4_GROUP, self.scale).float()
        else:
            from lorakit.quant.nf4 import dequantize_nf4

            y = F.linear(x, dequantize_nf4(self.w).to(x.dtype))
        return y if self.bias is None else y + self.bias


def _fbgemm_fp16(w16: Tensor, bias: Tensor | None):
    """FBGEMM's packed fp16 weight (bias inside) for ``quantized.linear_dynamic_fp16``; None where unavailable."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    return torch.ops.quantized.linear_prepack_fp16(w16.float(), bias)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: ``(q (out, in) int8, scale (out,) fp32)`` with ``w ~ q * scale``."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def pack_int4(w: Tensor) -> tuple[Tensor, Tensor]:
    """Asymmetric 4-bit in groups of `INT4_GROUP` columns, packed for ``torch._weight_int4pack_mm_for_cpu``.

    Returns ``(packed, scales_and_zeros (in / group, out, 2) bf16)``; the kernel computes
    ``w ~ (q - 8) * scale + zero`` per group.
    """
    out_f, in_f = w.shape
    if in_f % INT4_GROUP:
        raise ConfigError(f"int4 weights need in_features divisible by {INT4_GROUP}, got {in_f}; use int8")
    groups = w.reshape(out_f, in_f // INT4_GROUP, INT4_GROUP)  # (out, G, group)
    lo, hi = groups.amin(-1), groups.amax(-1)  # (out, G)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6)
    zero = lo + 8 * scale  # value of code 8
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    q = q.reshape(out_f, in_f)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros  # (G, out, 2)
