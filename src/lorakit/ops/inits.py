"""Data-dependent LoRA initialisations as pure functions on a base weight: PiSSA, OLoRA, LoftQ.

Each takes the frozen weight ``W`` in ``(out_features, in_features)`` layout and returns ``(A, B, W_res)``:
factors ``A: (r, in)``, ``B: (out, r)`` and the weight the base must hold instead so that, at initialisation,
``W_res + scaling * B A`` reproduces ``W`` (exactly for PiSSA / OLoRA, up to the low-rank approximation of the
quantization error for LoftQ). They follow PEFT's ``init_lora_weights`` options value for value, so adapters
made here and there from the same weight agree:

- PiSSA (Meng et al. 2024, sec. 3): the top-``r`` singular triplets, ``B = U_r sqrt(S_r / s)``,
  ``A = sqrt(S_r / s) V_r^T``; ``"pissa_niter_K"`` uses ``torch.svd_lowrank`` with ``K`` subspace iterations.
- OLoRA (Büyükakyüz 2024): the thin QR decomposition ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``.
- LoftQ (Li et al. 2023, alg. 1): alternate ``Q_t = NF4(W - L R)`` and ``L R = SVD_r(W - Q_t)``; the base
  becomes the dequantized ``Q_T``, ``B = L``, ``A = R`` (PEFT does not divide by the scaling here, so LoftQ
  reproduces ``W`` at ``scaling = 1``, i.e. ``lora_alpha = r``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lorakit.errors import ConfigError

_PISSA = re.compile(r"pissa(?:_niter_(\d+))?")


def is_data_init(init: object) -> bool:
    """True for the initialisations that read (and replace) the base weight."""
    return isinstance(init, str) and (init in ("olora", "loftq") or _PISSA.fullmatch(init) is not None)


def check_init(init: object) -> str | None:
    """A problem message for a malformed data-dependent init name (e.g. ``"pissa_niter_x"``), else None."""
    if isinstance(init, str) and init.startswith("pissa") and not _PISSA.fullmatch(init):
        return f"init_lora_weights={init!r}: expected 'pissa' or 'pissa_niter_<iterations>' (e.g. 'pissa_niter_4')"
    return None


def _check_rank(weight: Tensor, r: int, what: str) -> None:
    if r > min(weight.shape):
        raise ConfigError(
            f"{what} needs r <= min(out_features, in_features); got r={r} for a weight of shape "
            f"{tuple(weight.shape)}: lower r (or rank_pattern) for this module"
        )


@torch.no_grad()
def pissa_factors(weight: Tensor, r: int, scaling: float, init: str = "pissa") -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA: principal singular vectors in the adapter, the residual in the base.

    Args:
        weight: ``(out, in)`` base weight (any float dtype; the math runs in fp32).
        r: Adapter rank.
        scaling: The adapter's ``lora_alpha / r`` (or rsLoRA's); the factors are divided by it.
        init: ``"pissa"`` (full SVD) or ``"pissa_niter_K"`` (randomized SVD with K iterations; seeded by torch's
            global generator, as in PEFT).

    Returns:
        ``(A (r, in), B (out, r), W_res (out, in))``: fp32 factors; the residual in ``weight``'s dtype.
    """
    found = _PISSA.fullmatch(init)
    if found is None:
        raise ConfigError(check_init(init) or f"not a PiSSA init: {init!r}")
    _check_rank(weight, r, "PiSSA")
    w = weight.to(torch.float32)
    if found.group(1) is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=int(found.group(1)))  # (out, r), (r,), (in, r)
        vh = v.T
    root = torch.sqrt(s / scaling)  # (r,)
    a = root[:, None] * vh  # (r, in)
    b = u * root[None, :]  # (out, r)
    residual = w - scaling * (b @ a)
    return a.contiguous(), b.contiguous(), residual.to(weight.dtype)


@torch.no_grad()
def olora_factors(weight: Tensor, r: int, scaling: float) -> tuple[Tensor, Tensor, Tensor]:
    """OLoRA: the first ``r`` columns of ``Q`` and rows of ``R`` of ``W = Q R``; the base keeps ``W - s Q_r R_r``.

    Returns:
        ``(A (r, in), B (out, r), W_res (out, in))``: fp32 factors; the residual in ``weight``'s dtype.
    """
    _check_rank(weight, r, "OLoRA")
    w = weight.to(torch.float32)
    q, rr = torch.linalg.qr(w)  # (out, k), (k, in)
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    residual = w - scaling * (b @ a)
    return a, b, residual.to(weight.dtype)


def _low_rank(residual: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(L (out, r), R (r, in))`` with ``L R`` the best rank-``r`` approximation, ``sqrt(S)`` on both sides."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root[None, :], root[:, None] * vh[:r]


@torch.no_grad()
def loftq_factors(weight: Tensor, r: int, num_bits: int = 4, num_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ: a quantized base plus low-rank factors that absorb the quantization error.

    The quantizer is NF4 in blocks of 64 with fp32 scales (bitsandbytes' ``Params4bit`` with
    ``compress_statistics=False``, which PEFT uses): `lorakit.quant.quantize` of the returned base gives back
    the very codes LoftQ chose.

    Args:
        weight: ``(out, in)`` full-precision base weight.
        r: Adapter rank.
        num_bits: 4 (NF4); PEFT's 8-bit variant is not implemented.
        num_iter: Alternating steps (``loftq_config["loftq_iter"]``), at least 1.

    Returns:
        ``(A (r, in), B (out, r), W_q (out, in))``: fp32 factors and the dequantized base in ``weight``'s dtype.
    """
    from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

    if num_bits != 4:
        raise ConfigError(f"loftq_config loftq_bits={num_bits!r}: lorakit's LoftQ quantizes to NF4 only (4 bits)")
    if not isinstance(num_iter, int) or num_iter < 1:
        raise ConfigError(f"loftq_config loftq_iter={num_iter!r} must be a positive integer")
    _check_rank(weight, r, "LoftQ")
    w = weight.to(torch.float32)
    target = w
    for step in range(num_iter):
        dense = dequantize_nf4(quantize_nf4(target, double_quant=False), torch.float32)  # (out, in)
        lo, ro = _low_rank(w - dense, r)
        if step + 1 < num_iter:
            target = w - lo @ ro
    return ro.contiguous(), lo.contiguous(), dense.to(weight.dtype)
