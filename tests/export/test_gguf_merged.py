"""Merged GGUF export on the embedded default model (its own Q4_1 GGUF file is the base)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.export import base_info_for, export_gguf_merged, read_adapter_files, resolve_base
from lorakit.layers import iter_lora_layers

gguf = pytest.importorskip("gguf")


def dequantized(reader, name: str) -> np.ndarray:
    tensor = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))


def test_llama_q_k_row_order_matches_transformers_gguf_loader(default_model, default_model_dir):
    """Our HF -> GGUF row order for q/k is the inverse of the one transformers applied when it loaded the file."""
    model, _ = default_model
    base = base_info_for(default_model_dir)
    reader = gguf.GGUFReader(base.gguf_path)
    attn = model.model.layers[3].self_attn
    for proj, name in ((attn.q_proj, "blk.3.attn_q.weight"), (attn.k_proj, "blk.3.attn_k.weight")):
        assert np.array_equal(base.to_gguf_rows(name, proj.weight.detach().numpy()), dequantized(reader, name))


def test_merged_gguf_holds_lorakits_merged_weights_and_keeps_the_rest(default_model, tmp_path):
    model, _ = default_model
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False,
        use_rslora=True, alpha_pattern={"v_proj": 3.0}, layers_to_transform=[0, 5],
    )  # fmt: skip
    lorakit.add_adapter(model, config)
    lorakit.save_adapter(model, tmp_path / "ad")
    files = read_adapter_files(tmp_path / "ad")
    base = resolve_base(files)
    report = export_gguf_merged(files, base, tmp_path / "merged.gguf", quant="f32")
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output")
    assert sorted(report.changed) == sorted(f"blk.{i}.{k}.weight" for i in (0, 5) for k in kinds)
    lorakit.merge(model)
    src, out = gguf.GGUFReader(base.gguf_path), gguf.GGUFReader(tmp_path / "merged.gguf")
    for path, layer in iter_lora_layers(model):
        name = base.tensor_name(path)
        merged = base.to_gguf_rows(name, layer.base_layer.weight.detach().numpy())
        assert np.array_equal(dequantized(out, name), merged), name  # bit for bit: same dequant, same fp32 add
    kept = {t.name: t for t in src.tensors if t.name not in report.changed}
    for tensor in out.tensors:
        if tensor.name in kept:
            assert tensor.tensor_type == kept[tensor.name].tensor_type
            assert np.array_equal(np.asarray(tensor.data), np.asarray(kept[tensor.name].data)), tensor.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.rope.freq_base"):
        assert out.fields[key].contents() == src.fields[key].contents()
    assert len(out.tensors) == len(src.tensors)
