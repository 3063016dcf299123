"""lorakit's native CPU kernels (``csrc/``), compiled on first use with the system C compiler, called through ctypes.

A decode step on a CPU is one token per row: every frozen weight is read once, and the arithmetic between the
weight matmuls is small, so PyTorch's fixed cost per call (hundreds of calls per step) and its int8 kernel's bf16
activations cost more than the work. The kernels, all fp32 arithmetic:

- ``int8_gemm.c``: the int8 format's matmul (`Int8Weight`, used by `lorakit.inference.weights`): int8 weights with
  one scale per output row, widened to fp32 in registers; fp32 activations and accumulation; a tile of 16 output
  columns read once per k for up to 6 rows; every row summed in the same order whatever its batch-mates.
- ``attend.c``: attention of one new query per row over that row's own cached columns (`attend_one`).
- ``decode.c``: RMSNorm (`rms_norm`), the rotary embedding with the cache writes (`rope_cache`), per-row LoRA that
  computes only each row's own rank columns (`lora`), and a whole decoder layer over int8 weights in one call
  (`decode_layer`). `lorakit.inference.engine.DecodeEngine` uses them for decode steps on a CPU.

The shared library is built once per source and compiler flags with ``$CC`` (default ``cc``) into
``$LORAKIT_HOME/native`` (default ``~/.cache/lorakit/native``), written to a temporary name and renamed, so
concurrent processes never load a half-written file. It needs x86-64 with AVX2 and FMA, Linux's
``/proc/cpuinfo`` to say so, and a C compiler with OpenMP; where any is missing (or ``LORAKIT_NATIVE=0``),
`library` returns None (logged once, with the reason) and the engine runs PyTorch's ops and kernels instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("int8_gemm.c", "attend.c", "decode.c")]
HEADERS = [CSRC / "simd.h"]
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]
TILE = 16  # output rows per packed tile (NT in the C source)


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here (None: they can be built)."""
    if os.environ.get("LORAKIT_NATIVE", "1") == "0":
        return "LORAKIT_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "no /proc/cpuinfo to check the CPU for AVX2 and FMA"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    if missing:
        return f"the CPU lacks {' and '.join(missing)}"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return f"no C compiler ({os.environ.get('CC', 'cc')!r} is not on PATH; set CC)"
    return None


def _home() -> Path:
    return Path(os.environ.get("LORAKIT_HOME") or "~/.cache/lorakit").expanduser() / "native"


def _build() -> Path:
    """Compile the source (once per source and flags) and return the shared library's path."""
    cc = os.environ.get("CC", "cc")
    source = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(source + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = _home() / f"lorakit_native_{digest}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise OSError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first call; None (logged once) where it cannot run."""
    reason = unavailable_reason()
    if reason is None:
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"building it failed: {exc}"
        else:
            c_long, ptr = ctypes.c_long, ctypes.c_void_p
            lib.lk_int8_gemm.argtypes = [ptr, c_long, c_long, c_long, ptr, ptr, ptr, ptr, c_long, c_long, ctypes.c_int]
            lib.lk_int8_gemm.restype = None
            lib.lk_attend_one.argtypes = [ptr, ptr, ptr, c_long, c_long, ptr, ptr, c_long, c_long, c_long, c_long,
                                          ctypes.c_int]  # fmt: skip
            lib.lk_attend_one.restype = None
            lib.lk_rms_norm.argtypes = [ptr, c_long, c_long, ptr, ctypes.c_float, ptr]
            lib.lk_rope_cache.argtypes = [ptr, c_long, c_long, c_long, c_long, ptr, ptr, ptr, ptr, ptr, c_long, c_long,
                                          ptr]  # fmt: skip
            lib.lk_lora.argtypes = [ptr, c_long, c_long, ptr, ptr, c_long, c_long, ptr, ptr, ctypes.c_int]
            for fn in (lib.lk_rms_norm, lib.lk_rope_cache, lib.lk_lora):
                fn.restype = None
            lib.lk_decode_layer.argtypes = [ptr, c_long, c_long, ptr, ptr, ctypes.c_float, ptr, ptr, ptr, ptr, ptr,
                                            c_long, c_long, ptr, ptr, c_long, c_long, c_long, ctypes.c_int]  # fmt: skip
            lib.lk_decode_layer.restype = ctypes.c_int
            return lib
    log.info("lorakit's native kernels are off (%s); decode uses PyTorch's ops, int8 PyTorch's kernel", reason)
    return None


class Int8Weight:
    """A ``(out, in)`` int8 weight with per-output-row scales, packed for `lk_int8_gemm`; ``self(x)`` applies it.

    Args:
        q: int8 ``(out, in)``.
        scale: fp32 ``(out,)``: ``w ~ q * scale``.
        bias: Optional fp32 ``(out,)``.
    """

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the native int8 kernel is not available here (see lorakit.inference.native)")
        self._fn = lib.lk_int8_gemm
        self.out_features, self.in_features = q.shape
        pad = -self.out_features % TILE
        tiles = (self.out_features + pad) // TILE
        q = torch.cat([q, q.new_zeros(pad, self.in_features)])  # (tiles * 16, in)
        self.packed = q.reshape(tiles, TILE, self.in_features).transpose(1, 2).contiguous()  # (tiles, in, 16)
        self.scale = torch.cat([scale.float(), scale.new_zeros(pad, dtype=torch.float32)]).contiguous()
        self.bias = None if bias is None else torch.cat([bias.float(), bias.new_zeros(pad, dtype=torch.float32)])

    @property
    def nbytes(self) -> int:
        """Resident bytes: the packed weight (padded to 16 rows) and its scales."""
        return self.packed.numel() + 4 * self.scale.numel()

    def __call__(self, x: Tensor) -> Tensor:
        """``x @ (q * scale)^T + bias`` for fp32 ``x (..., in)`` on the CPU; fp32 ``(..., out)``."""
        lead = x.shape[:-1]
        if x.dim() != 2:
            x = x.reshape(-1, self.in_features)
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            x = x.float().contiguous()
        n = x.shape[0]
        y = torch.empty(*lead, self.out_features)
        if n:
            bias = 0 if self.bias is None else self.bias.data_ptr()
            self._fn(x.data_ptr(), n, self.in_features, x.stride(0), self.packed.data_ptr(), self.scale.data_ptr(),
                     bias, y.data_ptr(), self.out_features, self.out_features, torch.get_num_threads())  # fmt: skip
        return y


def attend_one(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """Decode attention (`lk_attend_one`), one query per row; returns ``(n, 1, H * D)`` fp32.

    ``q (n, H, 1, D)`` or ``(n, H, D)`` fp32; ``keys, values (n, Hkv, T, D)`` fp32 views of a cache whose last two
    dims are contiguous; ``valid (n,)`` int64, the columns each row sees (its length; the rest is masked).
    """
    n, heads, d = q.shape[0], q.shape[1], q.shape[-1]
    if keys.stride(-1) != 1 or keys.stride(-2) != d or keys.stride() != values.stride():
        raise ValueError(f"keys/values need contiguous (T, D) planes and equal strides, got {keys.stride()}")
    q = q.reshape(n, heads, d).contiguous()
    out = torch.empty(n, heads, d)
    library().lk_attend_one(q.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1),
                            valid.data_ptr(), out.data_ptr(), n, heads, keys.shape[1], d,
                            torch.get_num_threads())  # fmt: skip
    return out.reshape(n, 1, heads * d)


def _check(name: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name} needs contiguous fp32 CPU tensors, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _check_cache(keys: Tensor, first: int, n: int, span: int, *index: Tensor) -> None:
    """Rows ``first..first + n`` below column ``span`` fit ``keys (slots, Hkv, size, D)``; indices int64, contiguous."""
    slots, _, size, _ = keys.shape
    if any(t.dtype != torch.int64 or not t.is_contiguous() for t in index) or first + n > slots or span > size:
        raise ValueError(f"rows {first}..{first + n} below column {span} do not fit a cache of {tuple(keys.shape)}")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of each row of ``x (n, d)`` (as `lorakit.inference.llama.rms_norm`) in one call."""
    _check("rms_norm", x, weight)
    y = torch.empty_like(x)
    library().lk_rms_norm(x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), eps, y.data_ptr())
    return y


def rope_cache(
    qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, first: int, pos: Tensor, span: int
) -> Tensor:  # fmt: skip
    """Rotary embedding and cache writes after the fused q/k/v projection of one token per row; returns q.

    Rotates q and k of ``qkv (n, (H + 2 Hkv) D)`` by ``cos, sin (n, D)`` (the signed sine table), writes k and v
    into ``keys, values (slots, Hkv, size, D)`` at slot ``first + r``, column ``pos[r]`` (int64, each below
    ``span``), and returns q ``(n, H, D)``.
    """
    _check("rope_cache", qkv, cos, sin, keys, values)
    _, kv, size, d = keys.shape
    n = qkv.shape[0]
    _check_cache(keys, first, n, span, pos)
    q = torch.empty(n, qkv.shape[1] // d - 2 * kv, d)
    library().lk_rope_cache(qkv.data_ptr(), n, q.shape[1], kv, d, cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                            keys.data_ptr(), values.data_ptr(), size, first, pos.data_ptr())  # fmt: skip
    return q


def lora(x: Tensor, a_t: Tensor, b: Tensor, mask: Tensor | None, y: Tensor) -> Tensor:
    """``y += ((x A) * mask) B`` in place, ``A = a_t^T``: each row computes only its own rank columns (mask 1)."""
    _check("lora", x, a_t, b, y, *([] if mask is None else [mask]))
    library().lk_lora(x.data_ptr(), x.shape[0], x.shape[1], a_t.data_ptr(), b.data_ptr(), b.shape[0], b.shape[1],
                      None if mask is None else mask.data_ptr(), y.data_ptr(), torch.get_num_threads())  # fmt: skip
    return y


class _Proj(ctypes.Structure):  # lk_proj in csrc/decode.c
    _fields_ = [("packed", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_long), ("a_t", ctypes.c_void_p), ("b", ctypes.c_void_p), ("rank", ctypes.c_long),
                ("mask", ctypes.c_void_p)]  # fmt: skip


def decode_layer(
    x: Tensor, ln1: Tensor, ln2: Tensor, eps: float, projs: list, cos: Tensor, sin: Tensor, keys: Tensor,
    values: Tensor, first: int, pos: Tensor, valid: Tensor, span: int,
) -> Tensor:  # fmt: skip
    """One decoder layer for one token per row over int8 weights, in one call (`lk_decode_layer`); ``x`` in place.

    The same kernels, in the same order, as the per-step calls (`rms_norm`, `Int8Weight`, `lora`, `rope_cache`,
    `attend_one`) with the SiLU-gated MLP in C. ``projs``: for qkv, o, gate_up and down, ``(Int8Weight, adapters,
    mask)`` where ``adapters`` has the stacked factors ``a`` (None: no adapters), ``a_t`` and ``b``
    (`lorakit.inference.adapters.ProjectionAdapters`). ``x (n, hidden)`` contiguous fp32.
    """
    _check("decode_layer", x, ln1, ln2, cos, sin, keys, values)
    _, kv, size, d = keys.shape
    n = x.shape[0]
    _check_cache(keys, first, n, span, pos, valid)
    table = (_Proj * 4)()
    for slot, (weight, adapters, mask) in zip(table, projs):
        slot.packed, slot.scale, slot.out = weight.packed.data_ptr(), weight.scale.data_ptr(), weight.out_features
        slot.bias = None if weight.bias is None else weight.bias.data_ptr()
        if adapters.a is not None:
            a_t, b = adapters.a_t, adapters.b
            if a_t is None:
                raise ValueError("decode_layer needs the adapters' A^T (a_t), built where the native library loads")
            _check("decode_layer", a_t, b, *([] if mask is None else [mask]))
            slot.a_t, slot.b, slot.rank = a_t.data_ptr(), b.data_ptr(), b.shape[0]
            slot.mask = None if mask is None else mask.data_ptr()
    heads = projs[0][0].out_features // d - 2 * kv
    done = library().lk_decode_layer(
        x.data_ptr(), n, x.shape[1], ln1.data_ptr(), ln2.data_ptr(), eps, table, cos.data_ptr(), sin.data_ptr(),
        keys.data_ptr(), values.data_ptr(), size, first, pos.data_ptr(), valid.data_ptr(), heads, kv, d,
        torch.get_num_threads())  # fmt: skip
    if done != 0:
        raise MemoryError(f"lk_decode_layer could not allocate its scratch for {n} rows")
    return x
