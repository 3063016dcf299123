"""LoraLinear on nn.Linear (and subclasses) and transformers' GPT-2 Conv1D: the formula, init, merge, modes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraLinear

TOL = dict(rtol=1e-6, atol=1e-6)


def by_formula(layer: LoraLinear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``h = W x + b + (alpha / r) B A x`` written out with the layer's own tensors."""
    base = layer.base_layer
    w = base.weight.T if layer.fan_in_fan_out else base.weight  # (out, in)
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
    out = x @ w.T + (layer.lora_alpha[name] / layer.r[name]) * (x @ a.T @ b.T)
    return out + base.bias if base.bias is not None else out


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_w_x_plus_scaled_b_a_x(add_lora, bias):
    layer = add_lora(nn.Linear(12, 10, bias=bias), r=4, alpha=8, init=False)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), by_formula(layer, x), **TOL)
    assert layer.scaling["default"] == 2.0


def test_rslora_scales_by_alpha_over_sqrt_r(add_lora):
    layer = add_lora(nn.Linear(12, 10), r=16, alpha=8, init=False, use_rslora=True)
    assert layer.scaling["default"] == 2.0
    x = torch.randn(3, 12)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ a.T @ b.T), **TOL)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_adapter_is_a_no_op(add_lora, init):
    base = nn.Linear(12, 10)
    x = torch.randn(4, 12)
    expected = base(x)
    layer = add_lora(base, init=init)
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0


def test_init_false_is_not_a_no_op(add_lora):
    base = nn.Linear(12, 10)
    x = torch.randn(4, 12)
    expected = base(x)
    layer = add_lora(base, init=False)
    assert not torch.allclose(layer(x), expected, atol=1e-4)


def test_dropout_zero_makes_no_extra_copy_of_the_input(add_lora):
    layer = add_lora(nn.Linear(12, 10), dropout=0.0)
    x = torch.randn(2, 12)
    assert isinstance(layer.lora_dropout["default"], nn.Identity)
    assert layer.lora_dropout["default"](x) is x
    assert isinstance(add_lora(nn.Linear(12, 10), dropout=0.1).lora_dropout["default"], nn.Dropout)


def test_subclass_of_linear_gets_lora():
    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(MyLinear(8, 8), nn.ReLU(), MyLinear(8, 4))
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0", "2"]))
    assert isinstance(model[0], LoraLinear) and isinstance(model[2], LoraLinear)
    assert isinstance(model[0].base_layer, MyLinear)


def test_merged_output_equals_unmerged_and_unmerge_restores_weights(add_lora):
    layer = add_lora(nn.Linear(16, 12), init=False)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 16)
    unmerged = layer(x)
    layer.merge("default")
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, original + layer.delta_weight("default"), **TOL)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, **TOL)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_twice_is_a_no_op(add_lora):
    layer = add_lora(nn.Linear(16, 12), init=False)
    layer.merge("default")
    once = layer.base_layer.weight.detach().clone()
    layer.merge("default")
    assert torch.equal(layer.base_layer.weight, once)
    assert layer.merged_adapters == ["default"]


def test_unmerge_of_unmerged_adapter_raises(add_lora):
    layer = add_lora(nn.Linear(4, 4))
    with pytest.raises(lorakit.MergeError):
        layer.unmerge("default")


def test_merge_refuses_non_finite_adapter(add_lora):
    layer = add_lora(nn.Linear(4, 4), init=False)
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(lorakit.MergeError):
        layer.merge("default")
    assert torch.equal(layer.base_layer.weight, before)


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))


def test_adding_adapter_to_model_in_eval_mode_leaves_dropout_off():
    model = _dropout_model().eval()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["0", "2"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(8, 32)
    assert not model[0].lora_dropout["default"].training
    assert torch.equal(model(x), model(x))


def test_adding_adapter_to_model_in_train_mode_turns_dropout_on():
    model = _dropout_model().train()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["0", "2"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(8, 32)
    assert model[0].lora_dropout["default"].training
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_bf16_base_gets_fp32_adapters_and_runs(add_lora):
    layer = add_lora(nn.Linear(16, 8).to(torch.bfloat16), init=False)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = layer.base_layer(x).float() + layer.lora_forward(x, "default")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    layer.merge("default")
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_kaiming_uniform_a_matches_nn_linear_default_statistics(add_lora):
    fan_in = 256
    layer = add_lora(nn.Linear(fan_in, 8), r=64, init=True)
    a = layer.lora_A["default"].weight.detach()
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(a.mean().item()) < 0.05 * bound


def test_gaussian_a_has_std_one_over_r(add_lora):
    layer = add_lora(nn.Linear(512, 8), r=32, init="gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 32, rel=0.05)


# ---- GPT-2 Conv1D (weight stored (in, out)) ------------------------------------------------------------------
def _conv1d(nf: int, nx: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def test_gpt2_conv1d_forward_equals_formula(add_lora):
    layer = add_lora(_conv1d(nf=10, nx=12), init=False)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (12, 10)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(layer(x), by_formula(layer, x), **TOL)


def test_gpt2_conv1d_merge_uses_transposed_layout(add_lora):
    layer = add_lora(_conv1d(nf=10, nx=12), init=False)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 12)
    unmerged = layer(x)
    layer.merge("default")
    assert layer.delta_weight("default").shape == original.shape == (12, 10)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, **TOL)


def test_gpt2_model_conv1d_layers_get_lora_and_merged_outputs_match_unmerged():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False))
    wrapped = [p for p, _ in lorakit.layers.iter_lora_layers(model)]
    assert "transformer.h.0.attn.c_attn" in wrapped and "transformer.h.1.mlp.c_proj" in wrapped
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        unmerged = model(ids).logits
        lorakit.merge(model)
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
