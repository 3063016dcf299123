"""LoraConv on nn.Conv1d/2d: A a conv with the base's kernel and stride, B a 1x1 conv; merge is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.layers import LoraConv

TOL = dict(rtol=1e-5, atol=1e-5)


def by_formula(layer: LoraConv, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``conv(x; W + (alpha / r) B A)`` with B A reshaped to the kernel, the base's stride/padding/dilation."""
    base = layer.base_layer
    a = layer.lora_A[name].weight.flatten(1)  # (r, in * prod(kernel))
    b = layer.lora_B[name].weight.flatten(1)  # (out, r)
    w = base.weight + (layer.lora_alpha[name] / layer.r[name]) * (b @ a).reshape(base.weight.shape)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base.weight.dim() - 2]
    return conv(x, w, base.bias, stride=base.stride, padding=base.padding, dilation=base.dilation)


def test_conv2d_forward_equals_conv_with_w_plus_scaled_b_a(add_lora):
    layer = add_lora(nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1), r=2, alpha=4, init=False)
    assert layer.lora_A["default"].weight.shape == (2, 3, 3, 3)
    assert layer.lora_B["default"].weight.shape == (5, 2, 1, 1)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(layer(x), by_formula(layer, x), **TOL)


def test_conv1d_forward_equals_formula(add_lora):
    layer = add_lora(nn.Conv1d(4, 6, kernel_size=3, dilation=2, bias=False), r=3, alpha=3, init=False)
    x = torch.randn(2, 4, 15)
    torch.testing.assert_close(layer(x), by_formula(layer, x), **TOL)


def test_conv3d_forward_equals_formula(add_lora):
    layer = add_lora(nn.Conv3d(2, 3, kernel_size=(1, 2, 2), padding=(0, 1, 1)), r=2, alpha=2, init=False)
    x = torch.randn(1, 2, 3, 4, 4)
    torch.testing.assert_close(layer(x), by_formula(layer, x), **TOL)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_adapter_is_a_no_op(add_lora, init):
    base = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    expected = base(x)
    assert torch.equal(add_lora(base, init=init)(x), expected)


def test_init_false_is_not_a_no_op(add_lora):
    base = nn.Conv2d(3, 4, kernel_size=3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    expected = base(x)
    assert not torch.allclose(add_lora(base, init=False)(x), expected, atol=1e-4)


def test_merge_keeps_outputs_unmerge_restores_the_weight_and_merge_twice_is_a_no_op(add_lora):
    layer = add_lora(nn.Conv2d(3, 4, kernel_size=3, padding=1), init=False)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 3, 6, 6)
    unmerged = layer(x)
    layer.merge("default")
    once = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(layer(x), unmerged, **TOL)
    layer.merge("default")
    assert torch.equal(layer.base_layer.weight, once)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-6, atol=1e-6)


def test_grouped_conv_is_refused_with_a_config_error():
    with pytest.raises(ConfigError, match="groups=2"):
        lorakit.layers.wrap(nn.Conv2d(4, 4, kernel_size=3, groups=2))


def test_subclass_of_conv2d_gets_lora():
    class MyConv(nn.Conv2d):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(MyConv(3, 4, 3), nn.ReLU())
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    assert isinstance(model[0], LoraConv)
    assert type(model[0].lora_A["default"]) is nn.Conv2d
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(model[0](x), by_formula(model[0], x), **TOL)


def test_grouped_conv_among_targets_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["0", "1"]))
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d]
    assert lorakit.list_adapters(model) == [] and all(p.requires_grad for p in model.parameters())
