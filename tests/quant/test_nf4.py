"""NF4 codes (QLoRA sec. 3): the code book, packing, round-trip bounds, double quant, and bitsandbytes parity."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.quant.nf4 import (
    NF4_CODE,
    block_scales,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
    quantize_nf4,
)

MAX_HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2  # worst rounding, in units of absmax


def test_code_book_is_sorted_symmetric_range_with_exact_zero():
    code = nf4_code()
    assert code.numel() == 16 and torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[-1] == 1 and code[7] == 0  # 8 positive levels, 7 negative (QLoRA appendix E)


def test_packing_puts_the_first_code_in_the_high_nibble():
    # one block whose values sit exactly on levels 15, 0, 7, 8 -> bytes 0xF0, 0x78
    w = torch.tensor([1.0, -1.0, 0.0, NF4_CODE[8]])
    q = quantize_nf4(w)
    assert q.packed.tolist() == [0xF0, 0x78] and q.absmax.tolist() == [1.0]
    torch.testing.assert_close(dequantize_nf4(q), w, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(64, 576), (3, 577), (5, 13), (1,)])  # 577, 13: partial blocks; 65 values: odd
def test_round_trip_error_is_within_half_a_level_of_each_blocks_absmax(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    q = quantize_nf4(w)
    back = dequantize_nf4(q)
    assert back.shape == w.shape and q.packed.numel() == (w.numel() + 1) // 2
    scale = block_scales(q).repeat_interleave(64)[: w.numel()].reshape(shape)
    assert torch.all((back - w).abs() <= scale * MAX_HALF_GAP + 1e-7)
    assert ((back - w).pow(2).mean() / w.pow(2).mean()).item() < 0.02  # ~1% relative MSE for Gaussian weights


def test_double_quant_scales_are_close_and_smaller():
    torch.manual_seed(0)
    w = torch.randn(256, 576) * 0.02
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert torch.equal(plain.packed, dq.packed)  # codes use the exact fp32 absmax either way
    assert dq.absmax.dtype == torch.uint8 and dq.absmax2.numel() == -(-plain.absmax.numel() // 256)
    rel = (block_scales(dq) - plain.absmax).abs() / plain.absmax
    assert rel.max().item() < 0.02
    bits_per_weight = 8 * dq.nbytes() / w.numel()
    assert bits_per_weight < 4.13 < 8 * plain.nbytes() / w.numel()  # 4 + 8/64 + 32/(64*256) vs 4 + 32/64


def test_dequantize_casts_once_to_the_requested_dtype():
    w = torch.randn(4, 64)
    q = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), dequantize_nf4(q).to(torch.bfloat16))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.arange(64), "floating-point"),
        (torch.tensor([1.0, float("nan")]), "inf/NaN"),
        (torch.empty(0), "non-empty"),
    ],
)
def test_bad_tensors_are_refused_with_what_was_given(bad, match):
    with pytest.raises(ConfigError, match=match):
        quantize_nf4(bad)


def test_odd_block_size_is_refused():
    with pytest.raises(ConfigError, match="block_size"):
        quantize_nf4(torch.randn(8), block_size=63)


def test_all_zero_block_round_trips_to_zero():
    q = quantize_nf4(torch.zeros(2, 64))
    assert torch.equal(dequantize_nf4(q), torch.zeros(2, 64))


# ---- bitsandbytes parity (skipped only when bitsandbytes is not installed) ----------------------------------
@pytest.fixture
def bnb_functional():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return F


def test_code_books_equal_bitsandbytes(bnb_functional):
    assert nf4_code().tolist() == bnb_functional.get_4bit_type("nf4", device="cpu").tolist()
    assert torch.equal(dynamic_code(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("shape", [(576, 576), (3, 577), (7, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codes_and_values_are_bit_identical_to_bitsandbytes(bnb_functional, shape, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(w)
    assert torch.equal(packed.reshape(-1), q.packed) and torch.equal(state.absmax, q.absmax)
    assert torch.equal(bnb_functional.dequantize_4bit(packed, state), dequantize_nf4(q, dtype))


def test_double_quant_matches_bitsandbytes_up_to_near_ties(bnb_functional):
    """NF4 codes, offset and second-level scales are identical; bitsandbytes' C kernel for the 8-bit absmax
    codes is not exactly round-to-nearest, so a few absmax codes at near-ties differ by one level."""
    torch.manual_seed(0)
    w = torch.randn(576, 576) * 0.02
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w, double_quant=True)
    assert torch.equal(packed.reshape(-1), q.packed)
    assert torch.equal(state.offset, q.offset) and torch.equal(state.state2.absmax, q.absmax2)
    diff = (state.absmax.int() - q.absmax.int()).abs()
    assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 0.01
    ours, theirs = dequantize_nf4(q), bnb_functional.dequantize_4bit(packed, state)
    assert ((ours - theirs).abs() / w.abs().amax()).max().item() < 0.01
