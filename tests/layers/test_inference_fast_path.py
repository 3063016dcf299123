"""The no-autograd path of LoraLinear (one matmul + one in-place addmm into the base output) equals the formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraLinear


def _layer_model(n_adapters: int = 1, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    for i in range(n_adapters):
        config = LoraConfig(
            r=3 + i, lora_alpha=6 + i, target_modules=["0"], lora_dropout=dropout, init_lora_weights=False
        )
        lorakit.add_adapter(model, config, f"a{i}")
    return model


def _formula(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    layer = model[0]
    out = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for n in names:
        out = out + layer.scaling[n] * (x @ layer.lora_A[n].weight.T) @ layer.lora_B[n].weight.T
    return out


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_output_is_the_formula_for_one_and_stacked_adapters(context):
    model = _layer_model(n_adapters=2)
    x = torch.randn(2, 5, 12)
    for names in (["a0"], ["a0", "a1"]):
        lorakit.set_adapter(model, names)
        with context():
            fast = model(x)
        torch.testing.assert_close(fast, _formula(model, x, names), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(fast, model(x).detach(), atol=1e-6, rtol=1e-6)  # the autograd path agrees


def test_fast_path_is_taken_only_without_dropout_autograd_or_dtype_casts(monkeypatch):
    model = _layer_model(dropout=0.5)
    calls = []
    real = LoraLinear.lora_forward
    monkeypatch.setattr(LoraLinear, "lora_forward", lambda self, x, n: calls.append(n) or real(self, x, n))
    x = torch.randn(3, 12)
    with torch.no_grad():
        model.train()(x)  # dropout active: the per-layer path draws its mask
        assert calls == ["a0"]
        model.eval()(x)  # dropout inactive: fast path
        assert calls == ["a0"]
        model[0].lora_A["a0"].double()
        model[0].lora_B["a0"].double()
        model(x)  # an fp64 adapter on an fp32 base: the per-layer path casts
        assert calls == ["a0", "a0"]
    model(x)  # autograd on: the lean autograd function
    assert calls == ["a0", "a0", "a0"]


def test_fast_path_leaves_the_input_and_weights_untouched():
    model = _layer_model().eval()
    x = torch.randn(4, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x0 = x.clone()
    with torch.no_grad():
        model(x)
    assert torch.equal(x, x0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
