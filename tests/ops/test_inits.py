"""PiSSA / OLoRA / LoftQ factor math, checked against the real `peft` (same weight, same seed) and the formula."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn

from lorakit.errors import ConfigError
from lorakit.ops.inits import check_init, is_data_init, loftq_factors, olora_factors, pissa_factors
from lorakit.quant.nf4 import dequantize_nf4, quantize_nf4

ATOL = 1e-4


class _Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(24, 40)


def _peft_layer(init: str, r: int = 4, alpha: float = 8, seed: int = 5):
    net = _Net()
    original = net.proj.weight.detach().clone()
    torch.manual_seed(seed)
    model = get_peft_model(net, PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=init))
    layer = model.base_model.model.proj
    return original, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3"])
def test_pissa_equals_peft(init: str) -> None:
    original, a_ref, b_ref, res_ref = _peft_layer(init)
    torch.manual_seed(5)  # svd_lowrank draws from the global generator after PEFT's layer made A and B
    nn.Linear(24, 4, bias=False), nn.Linear(4, 40, bias=False)
    a, b, res = pissa_factors(original, r=4, scaling=2.0, init=init)
    torch.testing.assert_close(a, a_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(b, b_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(res, res_ref, atol=ATOL, rtol=0)


def test_pissa_residual_plus_update_is_the_original_weight() -> None:
    w = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    a, b, res = pissa_factors(w, r=6, scaling=0.5)
    torch.testing.assert_close(res + 0.5 * b @ a, w, atol=1e-5, rtol=0)
    # the adapter holds the principal part: its singular values are the top ones of w
    torch.testing.assert_close(torch.linalg.svdvals(0.5 * b @ a)[:6], torch.linalg.svdvals(w)[:6], atol=1e-4, rtol=0)


def test_olora_equals_peft() -> None:
    original, a_ref, b_ref, res_ref = _peft_layer("olora")
    a, b, res = olora_factors(original, r=4, scaling=2.0)
    torch.testing.assert_close(a, a_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(b, b_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(res, res_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)  # B has orthonormal columns


def _reference_loftq(w: torch.Tensor, r: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ alg. 1 written out with full SVD matrices (the formula, independently of lorakit.ops.inits)."""
    target = w
    for step in range(iters):
        q = dequantize_nf4(quantize_nf4(target, double_quant=False))
        u, s, vh = torch.linalg.svd(w - q, full_matrices=False)
        left = u @ torch.sqrt(torch.diag(s)[:, :r])
        right = torch.sqrt(torch.diag(s)[:r, :]) @ vh
        if step + 1 < iters:
            target = w - left @ right
    return right, left, q


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_matches_the_algorithm_and_shrinks_the_error(iters: int) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    a, b, q = loftq_factors(w, r=8, num_iter=iters)
    a_ref, b_ref, q_ref = _reference_loftq(w, 8, iters)
    torch.testing.assert_close(q, q_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(b @ a, b_ref @ a_ref, atol=1e-5, rtol=0)
    plain = dequantize_nf4(quantize_nf4(w))
    assert (w - q - b @ a).norm() < 0.9 * (w - plain).norm()  # the adapter absorbs part of the quantization error
    # the stored base is exactly representable: quantizing it again gives the same weights
    torch.testing.assert_close(dequantize_nf4(quantize_nf4(q)), q, atol=0, rtol=0)


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft_loftq_init(iters: int) -> None:
    """PEFT's own function (device string swapped to the CPU, see tests/peft_loftq_cpu.py) on the same weight."""
    from tests.peft_loftq_cpu import peft_loftq_init_on_cpu

    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(2)) * 0.05
    q_ref, a_ref, b_ref = peft_loftq_init_on_cpu()(w, num_bits=4, reduced_rank=6, num_iter=iters)
    a, b, q = loftq_factors(w, r=6, num_iter=iters)
    torch.testing.assert_close(q, q_ref, atol=ATOL, rtol=0)  # the same NF4 codes: bitsandbytes' CPU kernel
    torch.testing.assert_close(a, a_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(b, b_ref, atol=ATOL, rtol=0)


def test_bad_inputs_name_the_fix() -> None:
    w = torch.randn(8, 6)
    with pytest.raises(ConfigError, match="r <= min"):
        pissa_factors(w, r=7, scaling=1.0)
    with pytest.raises(ConfigError, match="NF4 only"):
        loftq_factors(w, r=2, num_bits=8)
    assert check_init("pissa_niter_x") is not None and check_init("pissa_niter_2") is None
    assert is_data_init("olora") and is_data_init("pissa_niter_16") and not is_data_init("gaussian")
