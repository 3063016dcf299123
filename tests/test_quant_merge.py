"""`merge_quantized`: the three ways out of a 4-bit base, each with its drift measured, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError, MergeError
from lorakit.layers import LoraLayer
from lorakit.quant import NF4Linear, is_quantized, quantize
from lorakit.quant_merge import merge_quantized

CONFIG = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
PROBE = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def original(tiny_llama):
    return tiny_llama


@pytest.fixture
def qlora(original):
    model = copy.deepcopy(original)
    quantize(model, "nf4")
    torch.manual_seed(1)
    lorakit.add_adapter(model, CONFIG)
    with torch.no_grad():  # smaller updates, as after real training
        for _, layer in lorakit.layers.iter_lora_layers(model):
            layer.lora_B["default"].weight.mul_(0.1)
    return model


def _logits(model):
    with torch.no_grad():
        return model(PROBE).logits


def test_dequant_mode_is_the_trained_function_in_plain_modules(qlora):
    expected = _logits(qlora)
    merged, report = merge_quantized(qlora, probe=PROBE)
    assert merged is qlora and report.mode == "dequant" and report.layers == 14
    assert not any(isinstance(m, (LoraLayer, NF4Linear)) for m in merged.modules())
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    assert report.max_abs_logit_delta < 1e-5 and report.top1_agreement == 1.0
    assert not lorakit.list_adapters(merged)


def test_dequant_mode_to_bf16_reports_its_rounding(qlora):
    merged, report = merge_quantized(qlora, dtype=torch.bfloat16, probe=PROBE)
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert 0 < report.max_abs_logit_delta < 0.05


def test_nf4_mode_requantizes_and_reports_a_larger_drift(qlora):
    expected = _logits(qlora)
    merged, report = merge_quantized(qlora, "nf4", probe=PROBE)
    assert isinstance(merged.model.layers[0].mlp.up_proj, NF4Linear) and not lorakit.list_adapters(merged)
    assert report.max_abs_logit_delta == pytest.approx((_logits(merged) - expected).abs().max().item())
    assert report.max_abs_logit_delta > 1e-4 and report.probe_tokens == PROBE.numel()


def test_original_mode_adds_exactly_the_update_to_the_high_precision_model(qlora, original, tmp_path):
    lorakit.save_adapter(qlora, tmp_path / "adapter")
    reference = copy.deepcopy(original)  # the same merge done by plain LoRA on the fp32 model
    lorakit.load_adapter(reference, tmp_path / "adapter")
    lorakit.unload(reference, merge=True)
    quantized_before = _logits(qlora)
    merged, report = merge_quantized(qlora, "original", merge_into=original, probe=PROBE)
    assert merged is original and report.layers == 14
    for (name, p), q in zip(merged.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(_logits(qlora), quantized_before)  # the 4-bit model is left as it was
    merged_logits = _logits(merged)
    assert report.max_abs_logit_delta == pytest.approx((merged_logits - quantized_before).abs().max().item())
    agreement = (merged_logits.argmax(-1) == quantized_before.argmax(-1)).float().mean().item()
    assert report.top1_agreement == pytest.approx(agreement)


def test_original_with_other_shapes_names_every_layer_that_differs(qlora, original):
    original.model.layers[1].mlp.up_proj = nn.Linear(32, 48, bias=False)
    del original.model.layers[0].self_attn.v_proj
    before = original.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(MergeError) as info:
        merge_quantized(qlora, "original", merge_into=original)
    message = str(info.value)
    assert "model.layers.1.mlp.up_proj" in message and "(48, 32)" in message and "(64, 32)" in message
    assert "model.layers.0.self_attn.v_proj: missing" in message
    assert torch.equal(original.model.layers[0].self_attn.q_proj.weight, before)  # nothing half-merged


def test_original_into_a_quantized_model_is_refused(qlora, original):
    quantize(original, "nf4")
    with pytest.raises(MergeError, match="NF4Linear"):
        merge_quantized(qlora, "original", merge_into=original)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"mode": "int4"}, "dequant"), ({"mode": "original"}, "merge_into"), ({"mode": "nf4", "merge_into": 1}, "only")],
)
def test_bad_mode_arguments(qlora, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        merge_quantized(qlora, **kwargs)


def test_a_quantized_model_without_adapters_dequantizes(original):
    quantize(original, "nf4")
    merged, report = merge_quantized(original)
    assert not any(is_quantized(m) for m in merged.modules()) and report.layers == 0
    assert report.max_abs_logit_delta < 1e-5
