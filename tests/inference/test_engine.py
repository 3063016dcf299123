"""The decode engine against transformers on the same model: logits of prefill and of every decode step (rows
with different adapters and lengths, rows leaving mid-way), and greedy tokens equal to ``model.generate``."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import prompts, with_adapters

import lorakit
from lorakit.errors import ConfigError
from lorakit.inference import DecodeEngine
from lorakit.inference.generate import run_engine
from lorakit.inference.reference import reference_generate


def _hf_next_logits(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    with torch.no_grad(), lorakit.route(model, [adapter]):
        return model(torch.tensor([ids])).logits[0, -1]


def test_prefill_and_decode_logits_equal_hf_forward_per_row(lora_llama):
    rows = ["qv", None, "all", "mlp"]
    ids = prompts(4)
    engine = DecodeEngine(lora_llama, max_batch=4, max_len=40)
    logits = engine.prefill(ids, rows)
    seqs = [list(p) for p in ids]
    for step in range(6):
        for i, (seq, adapter) in enumerate(zip(seqs, rows)):
            torch.testing.assert_close(logits[i], _hf_next_logits(lora_llama, seq, adapter), atol=2e-4, rtol=1e-4)
        tokens = logits.argmax(-1)
        for seq, t in zip(seqs, tokens.tolist()):
            seq.append(t)
        if step == 2:  # rows 1 and 3 leave; row 2 moves to slot 0 (the cache is compacted)
            engine.keep([2, 0])
            rows, seqs, tokens = [rows[2], rows[0]], [seqs[2], seqs[0]], tokens[[2, 0]]
        logits = engine.decode(tokens)


def test_greedy_tokens_equal_model_generate_with_rows_joining(lora_llama):
    rows = ["qv", "all", None, "mlp", "all", "qv", None]
    ids = prompts(7, seed=3)
    engine = DecodeEngine(lora_llama, max_batch=3, max_len=40)  # 7 prompts through 3 slots: rows join mid-way
    got = run_engine(engine, ids, rows, max_new_tokens=12, stops={7, 42})
    want = reference_generate(lora_llama, ids, rows, 12, [7, 42])
    assert got == want


def test_changed_adapter_factors_are_seen_by_the_next_prefill(lora_llama):
    engine = DecodeEngine(lora_llama, max_batch=2, max_len=24)
    ids = prompts(2, seed=5)
    before = run_engine(engine, ids, ["all", "all"], 8, set())
    with torch.no_grad():  # as a training step would
        for t in lorakit.adapter_state_dict(lora_llama, "all").values():
            t.mul_(-1.5)
    after = run_engine(engine, ids, ["all", "all"], 8, set())
    assert after == reference_generate(lora_llama, ids, ["all", "all"], 8, [])
    assert after != before


def test_adapter_added_after_the_engine_was_built_is_applied(tiny_llama):
    engine = DecodeEngine(tiny_llama, max_batch=2, max_len=24)
    with_adapters(tiny_llama, seed=4)  # wraps the projections the engine already packed
    ids = prompts(2, seed=6)
    assert run_engine(engine, ids, ["qv", "all"], 8, set()) == reference_generate(tiny_llama, ids, ["qv", "all"], 8, [])


def test_bad_sizes_and_unsupported_models_raise_config_errors(lora_llama):
    from tiny_models import tiny_gpt2

    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        DecodeEngine(tiny_gpt2())
    with pytest.raises(ConfigError, match="max_len"):
        DecodeEngine(lora_llama, max_len=10_000)
    engine = DecodeEngine(lora_llama, max_batch=1, max_len=8)
    with pytest.raises(ConfigError, match="max_batch=1"):
        engine.prefill([[1], [2]], [None, None])
    with pytest.raises(ConfigError, match="1..7 tokens"):
        engine.prefill([list(range(8))], [None])
    assert engine.rows == []  # a refused prefill leaves no half-added rows


def test_merged_base_weights_are_repacked_and_a_merged_adapter_cannot_route(lora_llama):
    from lorakit.errors import MergeError

    engine = DecodeEngine(lora_llama, max_batch=1, max_len=24)
    ids = prompts(1, seed=8)
    lorakit.set_adapter(lora_llama, "all")
    lorakit.merge(lora_llama, "all")  # base weights now include "all": the base row must see it
    inputs = torch.tensor(ids)
    with torch.no_grad():  # "all" is active and merged: forward adds nothing more
        want = lora_llama.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=8, do_sample=False)
    assert run_engine(engine, ids, [None], 8, set()) == [want[0, len(ids[0]) :].tolist()]
    with pytest.raises(MergeError, match="merged"):
        run_engine(engine, ids, ["all"], 8, set())


def test_a_non_finite_adapter_does_not_spill_into_batch_mates(lora_llama):
    ids = prompts(3, seed=7)
    clean = DecodeEngine(lora_llama, max_batch=3, max_len=24).prefill(ids, ["qv", None, "mlp"])
    with torch.no_grad():  # one B of "all" becomes NaN: 0 * NaN in the stacked matmul would reach every row
        next(t for k, t in lorakit.adapter_state_dict(lora_llama, "all").items() if "lora_B" in k).fill_(float("nan"))
    engine = DecodeEngine(lora_llama, max_batch=4, max_len=24)
    logits = engine.prefill([*ids, ids[0]], ["qv", None, "mlp", "all"])
    torch.testing.assert_close(logits[:3], clean)
    assert torch.isnan(logits[3]).all()
    step = engine.decode(logits.nan_to_num().argmax(-1))
    assert torch.isfinite(step[:3]).all() and torch.isnan(step[3]).all()
    assert "all" not in {e.adapter for e in engine.prefix._entries.values()}  # its rows ran without it: not cached


def test_only_row_runs_one_row_alone_and_keeps_nothing(lora_llama):
    ids, rows = prompts(3, seed=9), ["qv", "all", None]
    engine = DecodeEngine(lora_llama, max_batch=3, max_len=24)
    tokens = engine.prefill(ids, rows).argmax(-1)
    with engine.only_row(1):
        alone = engine.decode(tokens[1:2])
    assert engine.lengths == [len(p) for p in ids] and engine.rows == rows
    together = engine.decode(tokens)
    torch.testing.assert_close(alone[0], together[1], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(together[1], _hf_next_logits(lora_llama, [*ids[1], int(tokens[1])], "all"),
                               atol=2e-4, rtol=1e-4)  # fmt: skip


def test_a_dora_adapter_is_not_run_by_the_fast_path(lora_llama):
    config = lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
    lorakit.add_adapter(lora_llama, config, name="dora")
    assert "DoRA" in lorakit.inference.unsupported_reason(lora_llama)
    with pytest.raises(ConfigError, match="DoRA"):
        DecodeEngine(lora_llama, max_batch=1, max_len=16)


def test_fp16_weights_are_fp32_math_on_the_fp16_rounded_base(lora_llama):
    """The fp16 format rounds the frozen base only: equal to fp32 decoding of a model whose base is fp16-rounded
    (adapters untouched), rows of different lengths and adapters together."""
    import copy

    from lorakit.inference import llama
    from lorakit.layers.base import LoraLayer

    ids, rows = prompts(3, seed=11), ["qv", None, "all"]
    rounded = copy.deepcopy(lora_llama)
    with torch.no_grad():
        for layer in rounded.model.layers:
            for path in [p for parts in llama.FUSED.values() for p in parts]:  # the base projections, not A/B
                module = layer.get_submodule(path)
                base = module.base_layer if isinstance(module, LoraLayer) else module
                base.weight.copy_(base.weight.half().float())
        head = rounded.lm_head.weight.half().float()  # the LM head is packed too (the embedding stays fp32)
        rounded.lm_head.weight = torch.nn.Parameter(head, requires_grad=False)
    want = DecodeEngine(rounded, max_batch=3, max_len=30)
    got = DecodeEngine(lora_llama, weights="fp16", max_batch=3, max_len=30)
    a, b = want.prefill(ids, rows), got.prefill(ids, rows)
    torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)
    for _ in range(4):
        tokens = a.argmax(-1)
        a, b = want.decode(tokens), got.decode(tokens)
        torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)
    exact = DecodeEngine(lora_llama, max_batch=3, max_len=30).prefill(ids, rows)
    assert (exact - a).abs().max() > 1e-6  # the rounding changes the numbers: the test is not fp32 vs fp32
