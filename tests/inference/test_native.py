"""lorakit's native CPU kernels (`lorakit.inference.native`) against the formula, and their build and fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lorakit.inference import native
from lorakit.inference.weights import quantize_int8

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_gemm_equals_the_formula_for_every_row_count_and_ragged_shape(threads, bias):
    """Rows 0..17 (every micro-tile size and split), out not a multiple of 16, in odd (the k-loop remainders)."""
    gen = torch.Generator().manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_f, in_f in [(37, 53), (16, 64), (200, 7)]:
            q, scale = quantize_int8(torch.randn(out_f, in_f, generator=gen))
            b = torch.randn(out_f, generator=gen) if bias else None
            weight = native.Int8Weight(q, scale, b)
            dense = (q.double() * scale.double()[:, None]).T  # (in, out)
            for rows in range(18):
                x = torch.randn(rows, in_f, generator=gen)
                want = x.double() @ dense + (0 if b is None else b.double())
                got = weight(x)
                assert got.dtype == torch.float32 and got.shape == (rows, out_f)
                torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(old)


@needs_native
def test_int8_gemm_reads_strided_rows_and_leading_dims_and_keeps_the_inputs():
    gen = torch.Generator().manual_seed(1)
    q, scale = quantize_int8(torch.randn(24, 40, generator=gen))
    weight = native.Int8Weight(q, scale, None)
    wide = torch.randn(5, 100, generator=gen)
    x = wide[:, 10:50]  # rows 100 floats apart
    before = wide.clone()
    torch.testing.assert_close(weight(x), x @ (q.float() * scale[:, None]).T, atol=1e-4, rtol=1e-5)
    assert torch.equal(wide, before)
    assert weight.nbytes == 32 * 40 + 32 * 4  # padded to two tiles of 16 rows, fp32 scales
    batched = torch.randn(2, 3, 40, generator=gen)  # (..., in) as F.linear takes it
    torch.testing.assert_close(weight(batched), weight(batched.reshape(6, 40)).reshape(2, 3, 24), atol=0, rtol=0)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_attention_equals_sdpa_with_each_rows_own_length(threads):
    """Grouped-query attention over a strided cache view; row r sees columns < valid[r] (what the mask says)."""
    gen = torch.Generator().manual_seed(2)
    n, heads, kv, d, size, span = 5, 6, 2, 40, 32, 17
    cache_k = torch.randn(n + 2, kv, size, d, generator=gen)
    cache_v = torch.randn(n + 2, kv, size, d, generator=gen)
    keys, values = cache_k[1 : 1 + n, :, :span], cache_v[1 : 1 + n, :, :span]  # slots 1.., first span columns
    q = torch.randn(n, heads, 1, d, generator=gen)
    valid = torch.tensor([17, 1, 9, 16, 3])
    mask = (torch.arange(span) < valid[:, None])[:, None, None]  # (n, 1, 1, span)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # (n, H, 1, D)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.attend_one(q, keys, values, valid)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(n, 1, heads * d), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        native.attend_one(q, keys.transpose(2, 3), values.transpose(2, 3), valid)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def test_switched_off_or_no_compiler_falls_back_with_the_reason(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    assert native.unavailable_reason() == "LORAKIT_NATIVE=0"
    with caplog.at_level(logging.INFO, logger="lorakit.inference.native"):
        assert native.library() is None
    assert "LORAKIT_NATIVE=0" in caplog.text and "PyTorch's kernel" in caplog.text
    with pytest.raises(RuntimeError, match="not available"):
        native.Int8Weight(torch.zeros(2, 2, dtype=torch.int8), torch.ones(2), None)
    monkeypatch.delenv("LORAKIT_NATIVE")
    monkeypatch.setenv("CC", "no-such-compiler-here")
    if native.unavailable_reason() is None or "CPU" in native.unavailable_reason():
        pytest.skip(f"this CPU cannot run the kernels anyway: {native.unavailable_reason()}")
    assert "no C compiler ('no-such-compiler-here'" in native.unavailable_reason()


@needs_native
def test_a_failing_compiler_leaves_no_library_behind(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exits 1, writes nothing
    with caplog.at_level(logging.INFO, logger="lorakit.inference.native"):
        assert native.library() is None
    assert "building it failed: false failed (1)" in caplog.text
    assert list((fresh_library / "native").iterdir()) == []  # no temporary or partial .so left


@needs_native
def test_built_once_per_source_then_reused(fresh_library):
    path = native._build()
    assert path.parent == fresh_library / "native" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert native._build() == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@needs_native
def test_int8_gemm_gives_a_row_the_same_bits_whatever_its_batch_mates():
    """Every row sums its products in one order (the tile is widened once and shared by chunks of rows)."""
    gen = torch.Generator().manual_seed(3)
    q, scale = quantize_int8(torch.randn(48, 300, generator=gen))
    weight = native.Int8Weight(q, scale, torch.randn(48, generator=gen))
    x = torch.randn(17, 300, generator=gen)
    alone = torch.cat([weight(x[i : i + 1]) for i in range(17)])
    for rows in (2, 5, 6, 7, 13, 16, 17):
        assert torch.equal(weight(x[:rows]), alone[:rows]), rows


@needs_native
def test_rms_norm_equals_the_reference():
    from lorakit.inference.llama import rms_norm

    gen = torch.Generator().manual_seed(4)
    x, w = torch.randn(7, 70, generator=gen) * 3, torch.randn(70, generator=gen)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        native.rms_norm(x.T, w, 1e-5)


@needs_native
def test_rope_cache_rotates_q_and_k_and_writes_each_row_at_its_own_slot_and_column():
    from lorakit.inference.llama import rotate, signed_sin

    gen = torch.Generator().manual_seed(5)
    n, heads, kv, d, size, first = 3, 4, 2, 16, 10, 2
    qkv = torch.randn(n, (heads + 2 * kv) * d, generator=gen)
    angles = torch.rand(n, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), signed_sin(torch.cat([angles.sin()] * 2, -1))
    keys, values = torch.zeros(6, kv, size, d), torch.zeros(6, kv, size, d)
    pos = torch.tensor([0, 7, 3])
    q = native.rope_cache(qkv, cos, sin, keys, values, first, pos, span=8)
    heads_all = qkv.view(n, heads + 2 * kv, d)
    want = rotate(heads_all[:, : heads + kv], cos[:, None], sin[:, None])  # (n, H + Hkv, D)
    torch.testing.assert_close(q, want[:, :heads], atol=1e-6, rtol=1e-6)
    for r in range(n):
        torch.testing.assert_close(keys[first + r, :, pos[r]], want[r, heads:], atol=1e-6, rtol=1e-6)
        assert torch.equal(values[first + r, :, pos[r]], heads_all[r, heads + kv :])
    written = (keys != 0).any(-1)
    assert int(written.sum()) == n * kv  # nothing else touched
    with pytest.raises(ValueError, match="do not fit"):
        native.rope_cache(qkv, cos, sin, keys, values, 4, pos, span=8)  # slots 4..6 of 6


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_lora_adds_each_rows_own_rank_columns(threads):
    from lorakit.inference.adapters import ProjectionAdapters

    gen = torch.Generator().manual_seed(6)
    n, d_in, d_out, rank = 5, 40, 24, 12
    x, y = torch.randn(n, d_in, generator=gen), torch.randn(n, d_out, generator=gen)
    a, b = torch.randn(d_in, rank, generator=gen), torch.randn(rank, d_out, generator=gen)
    mask = torch.zeros(n, rank)
    mask[[0, 2], :4], mask[[1, 3], 4:], mask[4, 4:8] = 1, 1, 1  # rows 0/2, 1/3 and 4: three adapters' columns
    want = y + ((x @ a) * mask) @ b
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.lora(x, a.T.contiguous(), b, mask, y.clone())
        unmasked = native.lora(x, a.T.contiguous(), b, None, y.clone())
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(unmasked, y + x @ a @ b, atol=1e-4, rtol=1e-5)
    assert ProjectionAdapters([], []).a_t is None  # no adapters: nothing to apply


@needs_native
def test_fused_int8_layers_equal_the_per_call_kernels_with_mixed_adapters(lora_llama, monkeypatch):
    """`native.decode_layer` (a layer per call) against the same kernels called one by one from Python."""
    from decode_helpers import prompts

    from lorakit.inference import DecodeEngine
    from lorakit.inference.generate import run_engine

    calls = []
    real = native.decode_layer
    monkeypatch.setattr(native, "decode_layer", lambda *a: calls.append(1) or real(*a))
    rows = ["qv", None, "all", "mlp", "all"]
    ids = prompts(5, seed=7)
    fused = DecodeEngine(lora_llama, weights="int8", max_batch=5, max_len=40)
    split = DecodeEngine(lora_llama, weights="int8", max_batch=5, max_len=40)
    split._fuse_layers = False
    a, b = fused.prefill(ids, rows), split.prefill(ids, rows)
    for step in range(5):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        tokens = a.argmax(-1)
        assert torch.equal(tokens, b.argmax(-1))
        if step == 2:  # rows leave, the cache is compacted
            fused.keep([4, 0, 2])
            split.keep([4, 0, 2])
            tokens = tokens[[4, 0, 2]]
        a, b = fused.decode(tokens), split.decode(tokens)
    assert len(calls) == 5 * len(fused.blocks)  # every decode step went through the fused layers
    fused.reset()
    split.reset()
    assert run_engine(fused, ids, rows, 10, set()) == run_engine(split, ids, rows, 10, set())
