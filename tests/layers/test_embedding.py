"""LoraEmbedding: ``E[x] + (alpha / r) (B A)^T [x]`` with PEFT's layout (A: (r, vocab), B: (dim, r))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraEmbedding

TOL = dict(rtol=1e-6, atol=1e-6)


def by_formula(layer: LoraEmbedding, ids: torch.Tensor, name: str = "default") -> torch.Tensor:
    a = layer.lora_embedding_A[name]  # (r, vocab)
    b = layer.lora_embedding_B[name]  # (dim, r)
    table = layer.base_layer.weight + (layer.lora_alpha[name] / layer.r[name]) * (b @ a).T  # (vocab, dim)
    return table[ids]


def test_forward_equals_table_plus_scaled_b_a(add_lora):
    layer = add_lora(nn.Embedding(20, 6), r=3, alpha=6, init=False)
    assert layer.lora_embedding_A["default"].shape == (3, 20)
    assert layer.lora_embedding_B["default"].shape == (6, 3)
    ids = torch.randint(0, 20, (4, 5))
    torch.testing.assert_close(layer(ids), by_formula(layer, ids), **TOL)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_fresh_adapter_is_a_no_op(add_lora, init):
    base = nn.Embedding(20, 6)
    ids = torch.randint(0, 20, (3, 4))
    expected = base(ids)
    layer = add_lora(base, init=init)
    assert torch.equal(layer(ids), expected)


def test_init_false_is_not_a_no_op(add_lora):
    base = nn.Embedding(20, 6)
    ids = torch.arange(20)
    expected = base(ids)
    assert not torch.allclose(add_lora(base, init=False)(ids), expected, atol=1e-4)


def test_padding_idx_row_is_respected_like_the_base(add_lora):
    layer = add_lora(nn.Embedding(10, 4, padding_idx=0), init=False)
    ids = torch.tensor([[0, 3, 0, 5]])
    torch.testing.assert_close(layer(ids), by_formula(layer, ids), **TOL)


def test_merge_keeps_outputs_unmerge_restores_the_weight_and_merge_twice_is_a_no_op(add_lora):
    layer = add_lora(nn.Embedding(20, 6), init=False)
    original = layer.base_layer.weight.detach().clone()
    ids = torch.randint(0, 20, (3, 7))
    unmerged = layer(ids)
    layer.merge("default")
    once = layer.base_layer.weight.detach().clone()
    torch.testing.assert_close(layer(ids), unmerged, rtol=1e-5, atol=1e-5)
    layer.merge("default")
    assert torch.equal(layer.base_layer.weight, once)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, **TOL)


def test_embedding_of_a_model_gets_lora_when_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16)).eval()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"]))
    assert isinstance(model[0], LoraEmbedding)
    assert model[0].lora_embedding_A["default"].requires_grad
    assert not model[0].base_layer.weight.requires_grad


def test_bf16_embedding_gets_fp32_adapters_and_runs(add_lora):
    layer = add_lora(nn.Embedding(20, 6).to(torch.bfloat16), init=False)
    assert layer.lora_embedding_A["default"].dtype == torch.float32
    out = layer(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
