"""PEFT's own ``loftq_init`` (peft.utils.loftq_utils), made to run on the CPU for the LoftQ reference tests.

PEFT 0.21 hard-codes its compute device: ``compute_device = "xpu" if is_xpu_available() else "cuda"``, then
``weight.to(device=compute_device)``, so on a CPU-only torch it stops with ``AssertionError: Torch not compiled
with CUDA enabled``. Everything it computes with runs on the CPU (bitsandbytes >= 0.49 quantizes and dequantizes
NF4 there; the SVD is torch's). This helper runs PEFT's unmodified function body with that one device string
constant replaced by ``"cpu"``: no PEFT code is copied or rewritten, and the test fails loudly if PEFT's function
no longer has the constant (then the shim is no longer needed, or no longer valid).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable

import torch


def peft_loftq_init_on_cpu() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``loftq_init(weight, num_bits, reduced_rank, num_iter) -> (dequantized Q, A, B)``, PEFT's, on the CPU."""
    import pytest

    pytest.importorskip("bitsandbytes", reason="PEFT's LoftQ quantizes with bitsandbytes (the test extra, x86_64)")
    from peft.utils import loftq_utils

    fn = inspect.unwrap(loftq_utils.loftq_init)  # under @torch.no_grad()
    consts = fn.__code__.co_consts
    if "cuda" not in consts:
        raise AssertionError("peft's loftq_init no longer names the 'cuda' device: revisit tests/peft_loftq_cpu.py")
    code = fn.__code__.replace(co_consts=tuple("cpu" if c == "cuda" else c for c in consts))
    on_cpu = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.no_grad()(on_cpu)
