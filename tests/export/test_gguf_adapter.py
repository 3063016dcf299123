"""GGUF adapter export on a tiny Llama: the file holds lorakit's exact update in llama.cpp's convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import tiny_llama_base, write_adapter
from tiny_models import tiny_llama

import lorakit
from lorakit.cli import main
from lorakit.errors import IncompatibleAdapterError
from lorakit.export import export_flat_peft, export_gguf_adapter, read_adapter_files
from lorakit.layers import iter_lora_layers

gguf = pytest.importorskip("gguf")
PATTERNED = {"use_rslora": True, "rank_pattern": {"o_proj": 8}, "ranks": {"o_proj": 8}, "alpha_pattern": {"v_proj": 3}}


def lorakit_deltas(folder) -> dict[str, torch.Tensor]:
    """``scaling * B A`` per module as lorakit itself computes it after loading the adapter."""
    model = tiny_llama()
    lorakit.load_adapter(model, folder)
    return {path: layer.delta_weight("default") for path, layer in iter_lora_layers(model)}


def gguf_updates(path) -> dict[str, np.ndarray]:
    """What llama.cpp applies per base tensor: ``alpha / r * B A`` with r read from lora_b (llama-adapter.h)."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    deq = gguf.quants.dequantize
    t = {x.name: deq(x.data, x.tensor_type).reshape(tuple(reversed(x.shape))) for x in reader.tensors}
    out = {}
    for name in {n.rsplit(".", 1)[0] for n in t}:
        a, b = t[f"{name}.lora_a"], t[f"{name}.lora_b"]  # (r, in), (out, r)
        out[name] = (alpha / b.shape[1]) * (b.astype(np.float64) @ a.astype(np.float64))
    return out


@pytest.mark.parametrize("settings", [{}, PATTERNED], ids=["plain", "rslora+patterns"])
def test_exported_adapter_applies_lorakits_update(tmp_path, settings):
    folder = write_adapter(tmp_path / "ad", **dict(settings))
    base = tiny_llama_base()
    report = export_gguf_adapter(read_adapter_files(folder), base, tmp_path / "ad.gguf")
    updates = gguf_updates(tmp_path / "ad.gguf")
    deltas = lorakit_deltas(folder)
    assert report.tensors == 2 * len(deltas) == 2 * len(updates)
    assert len(report.folded) == (len(deltas) if settings else 0)
    for path, delta in deltas.items():
        name = base.tensor_name(path)
        expected = base.to_gguf_rows(name, delta.double().numpy())
        np.testing.assert_allclose(updates[name], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_q_and_k_rows_follow_llama_cpp_rotary_order(tmp_path):
    folder = write_adapter(tmp_path / "ad", targets=("q_proj", "v_proj"))
    base = tiny_llama_base()
    export_gguf_adapter(read_adapter_files(folder), base, tmp_path / "ad.gguf")
    b = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "ad.gguf").tensors}
    files = read_adapter_files(folder)
    q = files.modules["model.layers.0.self_attn.q_proj"].b.numpy()  # (32, r): 4 heads of 8 rows
    head0 = b["blk.0.attn_q.weight.lora_b"][:8]
    assert np.array_equal(head0, q[[0, 4, 1, 5, 2, 6, 3, 7]])  # halves interleaved within a head
    assert np.array_equal(b["blk.0.attn_v.weight.lora_b"], files.modules["model.layers.0.self_attn.v_proj"].b.numpy())


OUTTYPES = [("f16", "F16", "F16"), ("bf16", "BF16", "BF16"), ("q8_0", "Q8_0", "F16")]


@pytest.mark.parametrize(("outtype", "a_type", "b_type"), OUTTYPES)
def test_outtypes(tmp_path, outtype, a_type, b_type):
    folder = write_adapter(tmp_path / "ad", targets=("q_proj",))
    report = export_gguf_adapter(read_adapter_files(folder), tiny_llama_base(), tmp_path / "ad.gguf", outtype)
    types = {t.name.rsplit(".", 1)[-1]: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ad.gguf").tensors}
    assert types == {"lora_a": a_type, "lora_b": b_type}  # B's rows (r=4) are shorter than a q8_0 block
    assert len(report.f16_fallback) == (2 if outtype == "q8_0" else 0)


def test_modules_without_a_gguf_tensor_are_refused_together(tmp_path):
    folder = write_adapter(tmp_path / "ad", targets=("q_proj", "lm_head", "rotary_emb"))
    with pytest.raises(IncompatibleAdapterError, match="lm_head.*tied.*rotary_emb|rotary_emb.*lm_head"):
        export_gguf_adapter(read_adapter_files(folder), tiny_llama_base(), tmp_path / "ad.gguf")
    assert not (tmp_path / "ad.gguf").exists()


def test_export_cli_refuses_what_llama_cpp_rejects(tmp_path, capsys):
    folder = write_adapter(tmp_path / "ad", use_dora=True)
    tiny_llama().save_pretrained(tmp_path / "base")
    capsys.readouterr()
    args = ["export", str(folder), "--to", "gguf", "--out", str(tmp_path / "x.gguf"), "--model", str(tmp_path / "base")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and "llamacpp-dora" in err and "lorakit check" in err
    assert not (tmp_path / "x.gguf").exists()


def test_flat_peft_export_keeps_the_update_and_peft_reads_it(tmp_path):
    folder = write_adapter(tmp_path / "ad", **dict(PATTERNED))
    flat = export_flat_peft(read_adapter_files(folder), tmp_path / "flat")
    before, after = lorakit_deltas(folder), lorakit_deltas(flat)
    for path, delta in before.items():
        torch.testing.assert_close(after[path], delta, rtol=1e-5, atol=1e-6)
    config = read_adapter_files(flat).config
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["rank_pattern"]) == (8, 8, False, {})
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(flat))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.get_delta_weight("default"), before["model.layers.0.self_attn.q_proj"])


def test_token_embedding_pairs_have_the_shapes_llama_cpp_validates(tmp_path):
    """llama-adapter.cpp: for token_embd, A and B are flipped: b.ne[1] == n_embd and a.ne[1] == n_vocab."""
    folder = write_adapter(tmp_path / "ad", targets=("embed_tokens", "q_proj"))
    export_gguf_adapter(read_adapter_files(folder), tiny_llama_base(), tmp_path / "ad.gguf")
    ne = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(tmp_path / "ad.gguf").tensors}
    n_embd, n_vocab, r = 32, 128, 4
    assert ne["token_embd.weight.lora_a"] == (r, n_vocab) and ne["token_embd.weight.lora_b"] == (r, n_embd)
    assert ne["blk.0.attn_q.weight.lora_a"] == (n_embd, r) and ne["blk.0.attn_q.weight.lora_b"] == (r, n_embd)
