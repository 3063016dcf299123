"""Packed base weights against the dense fp32 matmul, with error bounds per format; nbytes per format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError
from lorakit.inference import native
from lorakit.inference.weights import PackedWeight, pack_int4, quantize_int8

# Relative error of y = x W^T (Frobenius) that each format must stay under, for Gaussian weights.
BOUNDS = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 1e-2, "int8": 1.5e-2, "int4": 0.12, "nf4": 0.12}


@pytest.mark.parametrize("fmt", [*BOUNDS, "int8-torch"])
def test_packed_matmul_is_close_to_fp32(fmt, monkeypatch):
    from lorakit.inference import weights

    if fmt == "int8-torch":  # PyTorch's kernel: where lorakit's native one cannot be built
        monkeypatch.setattr(weights, "library", lambda: None)
        fmt = "int8"
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    want = F.linear(x, w, b)
    got = PackedWeight(w, b, fmt)(x)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    err = ((got - want).norm() / want.norm()).item()
    assert err < BOUNDS[fmt], f"{fmt}: relative error {err:.4f}"


def test_int8_codes_and_scales_reconstruct_the_weight():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, -2.0]])
    q, scale = quantize_int8(w)
    torch.testing.assert_close(scale, torch.tensor([1 / 127, 2 / 127]))
    assert q.dtype == torch.int8 and q.tolist()[1] == [0, 127, -127]
    torch.testing.assert_close(q.float() * scale[:, None], w, atol=0.5 / 127 * 2, rtol=0)


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_bytes_per_format_shrink_as_documented(kernel, monkeypatch):
    from lorakit.inference import weights

    if kernel == "torch":
        monkeypatch.setattr(weights, "library", lambda: None)
    elif weights.library() is None:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    w = torch.randn(128, 256)
    sizes = {fmt: PackedWeight(w, None, fmt).nbytes for fmt in BOUNDS}
    assert sizes["fp32"] == 128 * 256 * 4 and sizes["bf16"] == sizes["fp16"] == 128 * 256 * 2
    assert sizes["int8"] == 128 * 256 + 128 * (4 if kernel == "native" else 2)  # fp32 / bf16 scales
    assert sizes["int4"] < sizes["int8"] / 1.5 and sizes["nf4"] < sizes["int8"] / 1.5


def test_fp32_shares_the_model_weight_and_bad_inputs_raise():
    w = torch.randn(8, 32)
    assert PackedWeight(w, None, "fp32").w.data_ptr() == w.data_ptr()  # no copy
    with pytest.raises(ConfigError, match="not one of"):
        PackedWeight(w, None, "int3")
    with pytest.raises(ConfigError, match="beyond fp16's range"):
        PackedWeight(torch.full((4, 32), 7e4), None, "fp16")
    with pytest.raises(ConfigError, match="divisible by 32"):
        pack_int4(torch.randn(8, 48))


@pytest.mark.parametrize("fbgemm", [True, False], ids=["fbgemm", "no-fbgemm"])
def test_fp16_rounds_only_the_weights_and_each_row_is_its_own(fbgemm, monkeypatch):
    """fp16 = fp32 math on the fp16-rounded weight (activations untouched), whatever the batch-mates; a CPU
    without FBGEMM gets the same numbers from a once-widened copy (and is told it holds fp32's bytes)."""
    from lorakit.inference import weights

    if not fbgemm:
        monkeypatch.setattr(weights, "_fbgemm_fp16", lambda w16, bias: None)
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(80, 64, generator=gen) * 0.05, torch.randn(80, generator=gen)
    x = torch.randn(6, 64, generator=gen)
    packed = PackedWeight(w, b, "fp16")
    assert (packed.packed is not None) == fbgemm and packed.nbytes == 80 * 64 * (2 if fbgemm else 4)
    assert fbgemm or packed.w.dtype == torch.float32  # widened once, not per call
    want = F.linear(x, w.half().float(), b)
    torch.testing.assert_close(packed(x), want, atol=1e-5, rtol=1e-5)
    x[1:] *= 1000.0  # huge batch-mates: a per-batch activation scale would change row 0
    torch.testing.assert_close(packed(x)[0], want[0], atol=1e-5, rtol=1e-5)
    assert (packed(x) - F.linear(x, w, b)).abs().max() > 0  # the rounding is real: not the fp32 weight
