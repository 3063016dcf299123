"""`NF4Linear`: dequantize-then-matmul forward, a backward that re-dequantizes and saves no dense weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.quant import NF4Linear


@pytest.fixture
def pair():
    """An NF4Linear and an fp32 nn.Linear holding its dequantized weight (the reference)."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    nf4 = NF4Linear.from_linear(linear)
    ref = nn.Linear(96, 40)
    with torch.no_grad():
        ref.weight.copy_(nf4.dequantized_weight())
        ref.bias.copy_(linear.bias)
    return nf4, ref


def test_forward_and_input_gradient_equal_an_fp32_layer_with_the_dequantized_weight(pair):
    nf4, ref = pair
    x = torch.randn(2, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(nf4(x), ref(x_ref), atol=1e-5, rtol=0)
    (nf4(x) ** 2).sum().backward()
    (ref(x_ref) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=0)


def test_backward_saves_no_dense_weight_and_no_input(pair):
    nf4, _ = pair
    x = torch.randn(8, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = nf4(x)
    assert all(not t.is_floating_point() or t.numel() < 96 * 40 / 8 for t in saved), [
        (t.dtype, tuple(t.shape)) for t in saved
    ]
    assert not any(t.shape == x.shape for t in saved)
    out.sum().backward()
    assert x.grad is not None


def test_the_layer_is_frozen_and_is_not_an_nn_linear(pair):
    nf4, _ = pair
    assert not isinstance(nf4, nn.Linear) and not hasattr(nf4, "weight")
    assert all(not p.requires_grad for p in nf4.parameters())
    assert (nf4.in_features, nf4.out_features) == (96, 40)


def test_an_unfrozen_bias_still_gets_its_gradient(pair):
    nf4, _ = pair
    nf4.bias.requires_grad_(True)
    nf4(torch.randn(3, 96)).sum().backward()
    torch.testing.assert_close(nf4.bias.grad, torch.full((40,), 3.0))


def test_bf16_compute_dtype_returns_the_input_dtype():
    torch.manual_seed(0)
    nf4 = NF4Linear.from_linear(nn.Linear(64, 16), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64, requires_grad=True)
    y = nf4(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    ref = x.detach().bfloat16() @ nf4.dequantized_weight().T + nf4.bias
    torch.testing.assert_close(y, ref.float(), atol=1e-2, rtol=0)


def test_state_dict_round_trips_into_a_fresh_layer(pair):
    nf4, _ = pair
    other = NF4Linear(torch.zeros(40, 96), torch.zeros(40))
    other.load_state_dict(nf4.state_dict())
    assert torch.equal(other.dequantized_weight(), nf4.dequantized_weight())


def test_requantize_replaces_the_weight_and_checks_the_shape(pair):
    nf4, _ = pair
    nf4.requantize_(torch.ones(40, 96))
    assert torch.equal(nf4.dequantized_weight(), torch.ones(40, 96))
    with pytest.raises(ConfigError, match=r"\(40, 96\)"):
        nf4.requantize_(torch.ones(96, 40))


def test_a_non_2d_weight_is_refused():
    with pytest.raises(ConfigError, match="2-D"):
        NF4Linear(torch.randn(4, 4, 4))


def test_casting_the_model_changes_the_compute_dtype_but_never_rounds_the_scales():
    torch.manual_seed(0)
    nf4 = NF4Linear.from_linear(nn.Linear(64, 300))  # 300 blocks: double-quant scales of 2 second-level blocks
    weight = nf4.dequantized_weight()
    nf4.to(torch.bfloat16)
    assert nf4.compute_dtype == torch.bfloat16 and nf4.bias.dtype == torch.bfloat16
    assert nf4.absmax2.dtype == torch.float32 and nf4.absmax_offset.dtype == torch.float32
    assert torch.equal(nf4.dequantized_weight(torch.float32), weight)
    assert nf4(torch.randn(2, 64)).dtype == torch.float32  # output in the input's dtype
    nf4.float()
    assert nf4.compute_dtype == torch.float32
