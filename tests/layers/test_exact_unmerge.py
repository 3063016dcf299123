"""Unmerge is exact: after any sequence of merges and unmerges the base weights are bit-identical (torch.equal).

Before, unmerge subtracted the update again; ``(W + d) - d`` rounds, so one merge and unmerge changed 16.5% of
SmolLM2's adapted fp32 weights and 49% of its bf16 ones, and a server that swaps merged adapters drifted.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import tiny_llama
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraLayer, iter_lora_layers

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("a", "b", "c")


def model_with_adapters(dtype: torch.dtype) -> nn.Module:
    model = tiny_llama().to(dtype)
    for i, name in enumerate(NAMES):
        torch.manual_seed(i)
        config = LoraConfig(r=4 + 2 * i, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        lorakit.add_adapter(model, config, name)
    lorakit.set_adapter(model, list(NAMES))
    return model


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {path: layer.base_layer.weight.detach().clone() for path, layer in iter_lora_layers(model)}


def equal(model: nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(layer.base_layer.weight, weights[p]) for p, layer in iter_lora_layers(model))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_then_unmerge_gives_the_weights_back_bit_for_bit(dtype):
    model = model_with_adapters(dtype)
    before = base_weights(model)
    lorakit.merge(model, "a")
    assert not equal(model, before)  # the update really changed the weights
    lorakit.unmerge(model)
    assert equal(model, before)
    assert all(layer.weight_before_merge is None for _, layer in iter_lora_layers(model))  # copy freed


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_sequence_of_merges_and_unmerges_is_exact(dtype):
    """Random sequences; each state must equal merging exactly the merged set, in order, into fresh weights."""
    model, fresh = model_with_adapters(dtype), model_with_adapters(dtype)
    before = base_weights(model)
    rng = random.Random(0)
    layers = [layer for _, layer in iter_lora_layers(model)]
    for _ in range(40):
        name = rng.choice(NAMES)
        if name in layers[0].merged_adapters and rng.random() < 0.6:
            for layer in layers:  # lorakit.unmerge takes them all out; one adapter is a layer verb
                layer.unmerge(name)
        else:
            lorakit.merge(model, name)
        reference = base_weights(fresh_merge(fresh, layers[0].merged_adapters))
        assert equal(model, reference)
    lorakit.unmerge(model)
    assert equal(model, before)


def fresh_merge(model: nn.Module, names: list[str]) -> nn.Module:
    lorakit.unmerge(model)
    for name in names:
        lorakit.merge(model, name)
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_disabled_context_restores_exactly(dtype):
    model = model_with_adapters(dtype)
    lorakit.merge(model, ["a", "b"])
    merged = base_weights(model)
    with lorakit.disabled(model):
        pass
    assert equal(model, merged)


def test_unmerging_an_adapter_that_is_not_merged_changes_nothing():
    model = model_with_adapters(torch.float32)
    lorakit.merge(model, "a")
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(lorakit.MergeError, match="'b' is not merged"):
        layer.unmerge("b")
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == ["a"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_model_swapping_merged_adapters_does_not_drift(default_model_dir, dtype):
    """What a server that swaps merged adapters does, 10 times, on the real SmolLM2 weights."""
    model, _ = lorakit.load_model(default_model_dir, dtype=dtype)
    for name in ("x", "y"):
        torch.manual_seed(len(name) + ord(name))
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        lorakit.add_adapter(model, config, name)
    before = base_weights(model)
    for _ in range(10):
        for name in ("x", "y"):
            lorakit.set_adapter(model, name)
            lorakit.merge(model)
            lorakit.unmerge(model)
    assert equal(model, before)
