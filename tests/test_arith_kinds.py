"""Arithmetic on every layer kind the file format has: embeddings, convs, GPT-2 ``Conv1D`` (fan_in_fan_out),
and adapters carrying ``modules_to_save``: the factors survive the flatten/unflatten round trip exactly."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from arith_helpers import ids, logits_with, save_random_adapter  # noqa: E402
from torch import nn

import lorakit
from lorakit.arith import combine, inspect_adapter, resize_adapter


def _outputs(base: nn.Module, path: Path, x: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, path)
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def test_embedding_adapters_combine_to_their_summed_update_and_full_rank_resize_keeps_outputs(tiny_llama, tmp_path):
    cfg = dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "q_proj"])
    a = save_random_adapter(tiny_llama, tmp_path / "a", seed=1, **cfg)
    b = save_random_adapter(tiny_llama, tmp_path / "b", seed=2, **cfg)
    combine([a, b], [1.0, 1.0], out=tmp_path / "ab")
    model = copy.deepcopy(tiny_llama)
    lorakit.load_adapter(model, a, name="a")
    lorakit.load_adapter(model, b, name="b")
    lorakit.set_adapter(model, ["a", "b"])  # active together, their updates add
    with torch.no_grad():
        both = model(ids()).logits
    torch.testing.assert_close(logits_with(tiny_llama, tmp_path / "ab"), both, atol=1e-5, rtol=0)
    resize_adapter(a, 3, tmp_path / "a3")
    torch.testing.assert_close(logits_with(tiny_llama, tmp_path / "a3"), logits_with(tiny_llama, a), atol=1e-5, rtol=0)
    report = inspect_adapter(a, tiny_llama)  # embedding base weight is (vocab, dim): the shape check must agree
    assert {s.path for s in report.layers} >= {"model.embed_tokens"}


def test_conv_adapters_keep_their_kernel_shapes(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    a = save_random_adapter(base, tmp_path / "a", seed=1, r=2, lora_alpha=4, target_modules=["0", "2"])
    b = save_random_adapter(base, tmp_path / "b", seed=2, r=3, lora_alpha=3, target_modules=["0"])
    x = torch.randn(2, 3, 6, 6)
    resize_adapter(a, 2, tmp_path / "a2")
    torch.testing.assert_close(_outputs(base, tmp_path / "a2", x), _outputs(base, a, x), atol=1e-5, rtol=0)
    combine([a, b], [0.5, 0.5], method="svd", rank=5, out=tmp_path / "ab")  # 5 = 2 + 3: lossless on layer 0
    model = copy.deepcopy(base)
    lorakit.load_adapter(model, tmp_path / "ab")
    assert tuple(model[0].lora_A["default"].weight.shape) == (5, 3, 3, 3)
    inspect_adapter(a, base)


def test_gpt2_conv1d_adapters_check_the_transposed_base_shape(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32)).eval()
    a = save_random_adapter(gpt2, tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["c_attn"])
    report = inspect_adapter(a, gpt2)  # c_attn weight is (32, 96): (in, out)
    assert len(report.layers) == 2 and all(s.relative_norm > 0 for s in report.layers)
    resize_adapter(a, 4, tmp_path / "a4")
    torch.testing.assert_close(logits_with(gpt2, tmp_path / "a4"), logits_with(gpt2, a), atol=1e-5, rtol=0)


def test_resize_keeps_modules_to_save_tensors(tiny_llama, tmp_path):
    a = save_random_adapter(tiny_llama, tmp_path / "a", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    result = resize_adapter(a, 4, tmp_path / "a4")
    assert result.adapter.extras and result.adapter.config.modules_to_save == ("lm_head",)
    torch.testing.assert_close(logits_with(tiny_llama, tmp_path / "a4"), logits_with(tiny_llama, a), atol=1e-5, rtol=0)
