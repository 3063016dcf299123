"""`quantize(model, "nf4")`: which layers become 4-bit, storage, bad input, and the bitsandbytes backend."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError
from lorakit.quant import NF4Linear, dequantized_weight, is_quantized, quantize, quantized_bytes


def test_only_block_linears_are_quantized_not_embeddings_or_the_head(tiny_llama):
    quantize(tiny_llama, "nf4")
    quantized = sorted(n for n, m in tiny_llama.named_modules() if is_quantized(m))
    assert len(quantized) == 2 * 7 and all(n.startswith("model.layers.") for n in quantized)
    assert type(tiny_llama.lm_head) is nn.Linear and type(tiny_llama.model.embed_tokens) is nn.Embedding
    info = quantized_bytes(tiny_llama)
    assert info["layers"] == 14 and info["ratio"] < 0.15


def test_quantized_model_stays_close_to_the_original(tiny_llama):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_llama(ids).logits
        quantize(tiny_llama, "nf4")
        after = tiny_llama(ids).logits
    assert ((after - before).norm() / before.norm()).item() < 0.1  # ~4-5% for 4-bit weights


def test_skip_modules_and_no_double_quant(tiny_llama):
    quantize(tiny_llama, "nf4", double_quant=False, skip_modules=["down_proj"])
    assert type(tiny_llama.model.layers[0].mlp.down_proj) is nn.Linear
    assert not tiny_llama.model.layers[0].mlp.up_proj.double_quant


def test_quantize_after_add_adapter_is_refused(tiny_llama):
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="before adding adapters"):
        quantize(tiny_llama, "nf4")


@pytest.mark.parametrize("kwargs, match", [({"method": "int8"}, "nf4"), ({"backend": "gptq"}, "torch")])
def test_unknown_method_or_backend_names_the_choices(tiny_llama, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        quantize(tiny_llama, **kwargs)


def test_quantizing_twice_says_so(tiny_llama):
    quantize(tiny_llama, "nf4")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(tiny_llama, "nf4")


def test_a_model_without_block_linears_is_refused():
    with pytest.raises(ConfigError, match="numbered transformer blocks"):
        quantize(nn.Sequential(nn.Embedding(4, 4)), "nf4")


def test_an_odd_real_shape_quantizes_with_a_partial_last_block():
    """577 inputs: rows straddle blocks and the last block is partial (bitsandbytes' layout); no padding error."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(577, 31)})])})
    weight = model.layers[0].proj.weight.detach().clone()
    quantize(model, "nf4")
    layer = model.layers[0].proj
    assert isinstance(layer, NF4Linear) and layer.qweight.numel() == (577 * 31 + 1) // 2
    assert (dequantized_weight(layer) - weight).abs().max().item() < 0.2 * weight.abs().max().item()


def test_bnb_backend_without_bitsandbytes_names_the_extra(tiny_llama, monkeypatch):
    real = importlib.import_module

    def missing(name, *args):
        if name.startswith("bitsandbytes"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantize(tiny_llama, "nf4", backend="bnb")
    assert not any(is_quantized(m) for m in tiny_llama.modules())  # nothing half-done
