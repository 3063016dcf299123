"""Mixed precision: bf16 autocast where the hardware does bf16 matmuls natively, fp32 elsewhere.

On this project's reference CPU (AVX512-BF16) bf16 autocast makes a SmolLM2 training step ~1.4x faster;
the adapter weights and optimizer state stay fp32 either way.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import torch


def make_autocast(precision: str, device: torch.device):
    """A no-argument context-manager factory: bf16 autocast where the hardware does bf16 matmuls fast."""
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    if not use_bf16:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # x86 CPUs with native bf16 dot products (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
