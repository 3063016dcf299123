"""NF4 quantization (QLoRA, Dettmers et al. 2023, sec. 3): pure functions on tensors, bit-compatible with bitsandbytes.

A weight is flattened row-major and cut into blocks of 64 values; each block keeps its absolute maximum
(``absmax``) and each value becomes the index of the nearest NF4 level of ``value / absmax`` (4 bits). Two codes
share a byte, the first in the high nibble (bitsandbytes' order). With double quantization (sec. 3, "Double
Quantization") the fp32 absmaxes themselves are stored as 8-bit codes of bitsandbytes' dynamic map, in blocks of
256, after subtracting their mean: 32/64 = 0.5 bits per weight for the scales drop to 8/64 + 32/(64*256) ~ 0.127.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from lorakit.errors import ConfigError

BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA appendix E; the
# values bitsandbytes ships in `functional.get_4bit_type("nf4")`, as fp32).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@cache
def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The NF4 code book as an fp32 tensor of 16 sorted values."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@cache
def _nf4_bounds(device: torch.device | str) -> Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2  # decision boundaries in fp32, as bitsandbytes computes them


@cache
def dynamic_code(device: torch.device | str = "cpu") -> Tensor:
    """The signed 8-bit dynamic map of bitsandbytes (``create_dynamic_map()``), for the double-quantized absmaxes.

    Dynamic exponent + fraction (Dettmers 2015, "8-bit approximations"): 7 decades, each with a linear grid
    of fraction values, both signs, plus 0 and 1; 256 sorted values.
    """
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


@dataclass
class NF4Tensor:
    """A quantized weight: packed codes plus the per-block scales (plain or double-quantized).

    Attributes:
        packed: uint8 ``(ceil(numel / 2),)``, two 4-bit codes per byte, the first in the high nibble.
        absmax: fp32 ``(blocks,)`` scales, or uint8 codes of ``dynamic_code`` when double-quantized.
        shape: the original weight shape.
        absmax2: fp32 ``(ceil(blocks / 256),)`` scales of the absmax codes (double quant only).
        offset: fp32 scalar mean subtracted from the absmaxes before quantizing them (double quant only).
    """

    packed: Tensor
    absmax: Tensor
    shape: tuple[int, ...]
    absmax2: Tensor | None = None
    offset: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes and scales)."""
        parts = (self.packed, self.absmax, self.absmax2, self.offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _check_float(weight: Tensor) -> None:
    if not weight.is_floating_point() or weight.numel() == 0:
        raise ConfigError(
            f"NF4 quantizes non-empty floating-point tensors; got dtype {weight.dtype} with shape {tuple(weight.shape)}"
        )
    if not torch.isfinite(weight).all():
        raise ConfigError(f"cannot quantize a tensor of shape {tuple(weight.shape)} with inf/NaN values to NF4")


def _block_scale(flat: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(absmax per block, flat / absmax clamped to [-1, 1])`` exactly as bitsandbytes' torch kernels compute them.

    Full blocks multiply by ``1 / absmax`` and a trailing partial block divides: bit-identical codes need the
    same rounding.
    """
    n = flat.numel()
    full = n - n % block
    blocks = flat[:full].reshape(-1, block)  # (full_blocks, block)
    absmax = blocks.abs().amax(dim=-1) if full else flat.new_zeros(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    return absmax, scaled


def quantize_blockwise_8bit(x: Tensor, block: int = ABSMAX_BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """8-bit codes of the dynamic map for ``x`` (1-D fp32), nearest level per block; returns ``(codes, absmax)``."""
    absmax, scaled = _block_scale(x.float(), block)
    code = dynamic_code(x.device)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds).to(torch.uint8), absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, block: int = ABSMAX_BLOCK_SIZE) -> Tensor:
    """Inverse of `quantize_blockwise_8bit` (fp32)."""
    values = dynamic_code(codes.device)[codes.long()]  # (n,)
    n = values.numel()
    scale = absmax.repeat_interleave(block)[:n]
    return values * scale


def quantize_nf4(weight: Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``weight`` (any shape, any float dtype) to NF4 with per-block absmax scales.

    Any size works: the weight is flattened and a trailing partial block gets its own absmax (as bitsandbytes
    does), so ``in_features`` need not be divisible by the block size; an odd count is padded by one code.

    Args:
        weight: The tensor to quantize (not modified).
        block_size: Values per absmax (64 in QLoRA).
        double_quant: Store the absmaxes as 8-bit codes in blocks of 256 (QLoRA's double quantization).

    Raises:
        ConfigError: non-float, empty or non-finite input, or a block size that is not a positive even number.
    """
    if block_size < 2 or block_size % 2:
        raise ConfigError(f"block_size must be a positive even number (QLoRA uses 64); got {block_size}")
    _check_float(weight)
    absmax, scaled = _block_scale(weight.detach().reshape(-1).float(), block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, _nf4_bounds(scaled.device)).to(torch.uint8)  # x == bound -> lower level
    packed = (q[::2] << 4) | q[1::2]  # (ceil(n / 2),)
    if not double_quant:
        return NF4Tensor(packed, absmax, tuple(weight.shape))
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset)
    return NF4Tensor(packed, codes, tuple(weight.shape), absmax2=absmax2, offset=offset)


def block_scales(q: NF4Tensor) -> Tensor:
    """The fp32 absmax of every block (decoding the 8-bit codes when double-quantized)."""
    if q.absmax2 is None:
        return q.absmax.float()
    return dequantize_blockwise_8bit(q.absmax, q.absmax2) + q.offset


@cache
def _byte_table(device: torch.device | str) -> Tensor:
    """``(256, 2)``: the two NF4 values a packed byte stands for (high nibble first)."""
    code, byte = nf4_code(device), torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=-1)


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32, block_size: int = BLOCK_SIZE) -> Tensor:
    """The dense tensor ``code[q] * absmax`` (computed in fp32, cast once to ``dtype``), in the original shape.

    One gather per byte (two values) and one broadcast multiply per block: this runs in every forward and
    backward of an `NF4Linear`, so it avoids per-nibble temporaries.
    """
    n = math.prod(q.shape)
    values = torch.index_select(_byte_table(q.packed.device), 0, q.packed.int())  # (ceil(n / 2), 2)
    scale = block_scales(q)  # (blocks,)
    if n % block_size == 0:
        out = values.view(-1, block_size).mul_(scale.view(-1, 1))  # (blocks, block_size)
    else:
        out = values.view(-1)[:n] * scale.repeat_interleave(block_size)[:n]
    return out.reshape(q.shape).to(dtype)
