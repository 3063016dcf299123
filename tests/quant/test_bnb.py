"""The bitsandbytes backend (skipped when bitsandbytes is not installed): parity with lorakit's NF4 and the
AVX512-BF16 trap (a repack on the first eval-mode forward made later gradients wrong)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraQuantLinear
from lorakit.quant import NF4Linear, dequantized_weight, disable_cpu_repacking, is_bnb_4bit, quantize
from lorakit.quant.bnb import to_bnb_linear4bit

bnb = pytest.importorskip("bitsandbytes")


def test_bnb_layer_holds_the_same_codes_as_nf4linear():
    torch.manual_seed(0)
    linear = nn.Linear(130, 40)
    ours = NF4Linear.from_linear(linear, double_quant=False)
    theirs = to_bnb_linear4bit(linear, double_quant=False)
    assert torch.equal(theirs.weight.data.reshape(-1), ours.qweight)
    assert torch.equal(dequantized_weight(theirs), ours.dequantized_weight())
    x = torch.randn(3, 130)
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-4)


def _input_grad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    layer(x).pow(2).sum().backward()
    return x.grad


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the trap needs a CPU with AVX512-BF16")
def test_avx512bf16_repack_trap_is_real_and_disabled_by_lorakit():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)  # with a bias the trapped layer raises instead
    x = torch.randn(4, 256)
    reference = _input_grad(NF4Linear.from_linear(linear), x)
    trapped = to_bnb_linear4bit(linear)
    trapped.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    safe = to_bnb_linear4bit(linear)  # lorakit sets the flag to False
    for layer in (trapped, safe):
        layer.eval()
        with torch.no_grad():
            layer(x)  # first eval-mode forward: the trapped layer repacks its weight here
        layer.train()
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        lost = _input_grad(trapped, x)
    assert lost is None or not torch.allclose(lost, reference, atol=1e-3)  # the silent bug this guards against
    torch.testing.assert_close(_input_grad(safe, x), reference, atol=1e-4, rtol=1e-4)


@pytest.fixture
def llama64():
    """A tiny Llama whose Linear inputs are multiples of 64 (what bitsandbytes' CPU kernel handles)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_bnb_backend_refuses_shapes_its_cpu_kernel_gets_wrong(tiny_llama):
    """bitsandbytes 0.50's CPU dequantize was wrong for in_features 32 (blocks straddle rows): refuse, don't drift.

    Whether the installed bitsandbytes still has that bug is measured here on one such layer: with the bug,
    quantize must refuse and change nothing; without it (fixed in later releases), the bnb layers must
    dequantize to exactly lorakit's NF4 weights.
    """
    import bitsandbytes as bnb

    from lorakit.quant.bnb import bnb_dequantized_weight, to_bnb_linear4bit

    probe = to_bnb_linear4bit(torch.nn.Linear(32, 8), double_quant=True)
    packed, state = probe.weight, probe.weight.quant_state
    buggy = not torch.allclose(
        bnb.functional.dequantize_4bit(packed, state).float(), bnb_dequantized_weight(probe, torch.float32), atol=1e-3
    )
    if buggy:
        with pytest.raises(lorakit.ConfigError, match="backend='torch'"):
            quantize(tiny_llama, "nf4", backend="bnb")
        assert not any(is_bnb_4bit(m) for m in tiny_llama.modules())  # all or nothing
        return
    quantize(tiny_llama, "nf4", backend="bnb")
    layers = [m for m in tiny_llama.modules() if is_bnb_4bit(m)]
    assert layers
    for m in layers:
        theirs = bnb.functional.dequantize_4bit(m.weight, m.weight.quant_state).float()
        torch.testing.assert_close(theirs, bnb_dequantized_weight(m, torch.float32), atol=1e-3, rtol=1e-3)


def test_lora_on_a_bnb_base_trains_and_matches_the_torch_backend(llama64):
    import copy

    tiny_llama = llama64
    twin = copy.deepcopy(tiny_llama)
    quantize(tiny_llama, "nf4", backend="bnb")
    quantize(twin, "nf4")
    assert is_bnb_4bit(tiny_llama.model.layers[0].mlp.up_proj)
    assert all(not m.support_avx512bf16_for_cpu for m in tiny_llama.modules() if is_bnb_4bit(m))
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    for model in (tiny_llama, twin):
        torch.manual_seed(1)
        lorakit.add_adapter(model, config)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantLinear) and layer.lora_A["default"].weight.dtype == torch.float32
    twin_base = twin.model.layers[0].self_attn.q_proj.base_layer
    torch.testing.assert_close(dequantized_weight(layer.base_layer), twin_base.dequantized_weight(), atol=1e-4, rtol=0)
    ids = torch.randint(0, 128, (2, 8))
    losses = [m(ids, labels=ids).loss for m in (tiny_llama, twin)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=0)
    for loss in losses:
        loss.backward()
    ga = tiny_llama.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
    gb = twin.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-3)


def test_a_model_loaded_4bit_by_transformers_takes_lorakit_adapters(llama64, tmp_path):
    """``BitsAndBytesConfig(load_in_4bit=True)`` (what CUDA users load) trains like lorakit's own NF4 base."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    llama64.save_pretrained(tmp_path / "fp32")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config, device_map="cpu")
    layers = [m for m in loaded.modules() if is_bnb_4bit(m)]
    trapped = sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers)  # bnb's default: CPU-dependent
    assert len(layers) == 14 and disable_cpu_repacking(loaded) == trapped
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    quantize(llama64, "nf4", double_quant=False)
    lora = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    for model in (loaded, llama64):
        torch.manual_seed(1)
        lorakit.add_adapter(model, lora)
        model.train()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = [m(ids, labels=ids).loss for m in (loaded, llama64)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    for loss in losses:
        loss.backward()
    ours, theirs = (lorakit.adapter_state_dict(m, "default") for m in (llama64, loaded))
    for key in ours:
        torch.testing.assert_close(theirs[key].grad, ours[key].grad, atol=1e-5, rtol=1e-4, msg=key)
