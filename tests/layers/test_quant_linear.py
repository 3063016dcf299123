"""`LoraQuantLinear`: LoRA on a 4-bit NF4 base trains like LoRA on the dequantized fp32 weights (QLoRA)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import MergeError
from lorakit.layers import LoraLinear, LoraQuantLinear, wrap
from lorakit.quant import NF4Linear, is_quantized, quantize
from lorakit.state import adapter_state_dict

CONFIG = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)


def _twins(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``model`` quantized to NF4, and an fp32 copy holding the dequantized weights; the same adapter on both."""
    dense = copy.deepcopy(model)
    quantize(model, "nf4")
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_quantized(module):
                dense.get_submodule(name).weight.copy_(module.dequantized_weight())
    for m in (model, dense):
        torch.manual_seed(1)
        lorakit.add_adapter(m, CONFIG)
    return model, dense


def test_lora_gradients_equal_an_fp32_model_holding_the_dequantized_weights(tiny_llama):
    qmodel, dense = _twins(tiny_llama)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    losses = [m(ids, labels=ids).loss for m in (qmodel, dense)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    for loss in losses:
        loss.backward()
    q_grads, d_grads = adapter_state_dict(qmodel, "default"), adapter_state_dict(dense, "default")
    assert list(q_grads) == list(d_grads) and len(q_grads) == 2 * 14
    for key in q_grads:
        torch.testing.assert_close(q_grads[key].grad, d_grads[key].grad, atol=1e-5, rtol=1e-5, msg=key)


def test_qlora_training_lowers_the_loss(tiny_llama):
    quantize(tiny_llama, "nf4")
    torch.manual_seed(0)
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    tiny_llama.train()
    ids = torch.arange(24).remainder(7).unsqueeze(0) + 3  # a tiny repeating "text"
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(20):
        loss = tiny_llama(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4  # 4.84 -> 4.25 (the same as fp32 LoRA on this tiny random model)
    assert all(not b.requires_grad for b in tiny_llama.buffers())


def test_a_qlora_adapter_loads_onto_the_unquantized_base(tiny_llama, tmp_path):
    fresh = copy.deepcopy(tiny_llama)
    quantize(tiny_llama, "nf4")
    torch.manual_seed(1)
    lorakit.add_adapter(tiny_llama, CONFIG)
    lorakit.save_adapter(tiny_llama, tmp_path / "adapter")
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    assert isinstance(fresh.model.layers[0].mlp.up_proj, LoraLinear)
    ours, theirs = adapter_state_dict(tiny_llama, "default"), adapter_state_dict(fresh, "default")
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_merging_into_the_4bit_base_is_refused_and_points_to_merge_quantized(tiny_llama):
    quantize(tiny_llama, "nf4")
    lorakit.add_adapter(tiny_llama, CONFIG)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        before = tiny_llama(ids).logits
    with pytest.raises(MergeError, match=r"model\.layers\.0\..*merge_quantized"):
        lorakit.merge(tiny_llama)
    with pytest.raises(MergeError, match="merge_quantized"):
        lorakit.unload(tiny_llama, merge=True)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, before)  # nothing changed
    with lorakit.disabled(tiny_llama), torch.no_grad():
        base = tiny_llama(ids).logits
    assert not torch.allclose(base, before)
    lorakit.unload(tiny_llama, merge=False)
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, NF4Linear)


def test_adapters_are_fp32_on_a_bf16_compute_base():
    layer = wrap(NF4Linear(torch.randn(16, 64), compute_dtype=torch.bfloat16))
    layer.update_layer("a", r=2, lora_alpha=4, lora_dropout=0.1, init=True, use_rslora=False)
    assert isinstance(layer, LoraQuantLinear)
    assert layer.lora_A["a"].weight.dtype == torch.float32 and layer.lora_B["a"].weight.shape == (16, 2)
    assert layer.weight.shape == (16, 64) and layer.weight.dtype == torch.bfloat16  # a dequantized copy


def test_the_quant_wrapper_sets_every_attribute_lora_linear_sets():
    """LoraQuantLinear builds itself without LoraLinear.__init__ (which reads a dense weight): keep them in sync."""
    plain = LoraLinear(nn.Linear(64, 16))
    quant = LoraQuantLinear(NF4Linear(torch.randn(16, 64)))
    assert set(vars(quant)) == set(vars(plain))
    assert {k for k, _ in quant.named_children()} == {k for k, _ in plain.named_children()}


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_llama):
    quantize(tiny_llama, "nf4")
    torch.manual_seed(1)
    lorakit.add_adapter(tiny_llama, CONFIG)
    twin = copy.deepcopy(tiny_llama).train()
    twin.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_llama.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for model in (tiny_llama, twin):
        model(ids, labels=ids).loss.backward()
    ours, theirs = adapter_state_dict(tiny_llama, "default"), adapter_state_dict(twin, "default")
    for key in ours:
        torch.testing.assert_close(ours[key].grad, theirs[key].grad, atol=1e-6, rtol=0, msg=key)


def test_bf16_autocast_backward_runs_and_keeps_fp32_gradients(tiny_llama):
    quantize(tiny_llama, "nf4")
    lorakit.add_adapter(tiny_llama, CONFIG)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tiny_llama(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in adapter_state_dict(tiny_llama, "default").values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
