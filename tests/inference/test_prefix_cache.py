"""The prompt-prefix KV cache: prompts that start like an earlier one (same adapter) compute only their rest, and
get the logits transformers computes for the whole prompt; anything that changes the weights empties it."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import prompts

import lorakit
from lorakit.errors import ConfigError
from lorakit.inference import DecodeEngine
from lorakit.inference.generate import run_engine
from lorakit.inference.prefix import PrefixCache, common_start
from lorakit.inference.reference import reference_generate

START = [5, 17, 99, 3, 64, 8, 21, 30, 77, 1]  # a shared "system prompt"


def _hf_next_logits(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    with torch.no_grad(), lorakit.route(model, [adapter]):
        return model(torch.tensor([ids])).logits[0, -1]


def _check_rows(model, engine, logits, seqs, rows, steps: int) -> None:
    """Prefill logits, then ``steps`` greedy decode steps, each equal to transformers' forward per row."""
    seqs = [list(s) for s in seqs]
    for step in range(steps + 1):
        for i, (seq, adapter) in enumerate(zip(seqs, rows)):
            torch.testing.assert_close(logits[i], _hf_next_logits(model, seq, adapter), atol=2e-4, rtol=1e-4)
        tokens = logits.argmax(-1)
        for seq, t in zip(seqs, tokens.tolist()):
            seq.append(t)
        if step < steps:
            logits = engine.decode(tokens)


def test_rows_reusing_cached_starts_of_different_lengths_equal_the_whole_prompt(lora_llama):
    engine = DecodeEngine(lora_llama, max_batch=4, max_len=48)
    engine.prefill([START + [40, 41, 42], START[:4] + [9]], ["all", "qv"])
    assert len(engine.prefix) == 2 and engine.prefix.hit_tokens == 0
    engine.reset()
    seqs = [
        START + [40, 41, 50, 51, 52],  # 12 tokens from the "all" entry
        START + [60],  # 10 from it
        START[:4] + [9],  # the whole "qv" entry again: all but the last token reused
        [7, 7, 7],
    ]  # nothing cached starts this way: computed in full
    rows = ["all", "all", "qv", "mlp"]
    logits = engine.prefill(seqs, rows)
    assert engine.prefix.hit_tokens == 12 + 10 + 4
    _check_rows(lora_llama, engine, logits, seqs, rows, steps=4)


def test_a_start_cached_under_another_adapter_is_not_reused(lora_llama):
    engine = DecodeEngine(lora_llama, max_batch=2, max_len=48)
    engine.prefill([START + [40]], ["all"])
    engine.reset()
    seqs, rows = [START + [41], START + [42]], [None, "qv"]
    logits = engine.prefill(seqs, rows)
    assert engine.prefix.hit_tokens == 0
    _check_rows(lora_llama, engine, logits, seqs, rows, steps=2)


def test_greedy_generation_with_the_cache_equals_the_reference_and_the_cache_off(lora_llama):
    ids = [START + p for p in prompts(7, seed=3)]
    rows = ["qv", "all", None, "mlp", "all", "qv", None]
    want = reference_generate(lora_llama, ids, rows, 10, [7, 42])
    cached = DecodeEngine(lora_llama, max_batch=3, max_len=48)  # 7 prompts through 3 slots: later ones reuse
    assert run_engine(cached, ids, rows, max_new_tokens=10, stops={7, 42}) == want
    assert cached.prefix.hit_tokens > 0
    off = DecodeEngine(lora_llama, max_batch=3, max_len=48, prefix_cache_mb=0)
    assert run_engine(off, ids, rows, max_new_tokens=10, stops={7, 42}) == want
    assert len(off.prefix) == 0 and off.prefix.hit_tokens == 0


def test_an_adapter_that_changed_loses_its_entries_and_the_others_keep_theirs(lora_llama):
    engine = DecodeEngine(lora_llama, max_batch=3, max_len=32)
    engine.prefill([START + [1], START + [3], START + [5]], ["all", "qv", None])
    engine.reset()
    with torch.no_grad():  # as a training step would
        for t in lorakit.adapter_state_dict(lora_llama, "all").values():
            t.mul_(-1.5)
    lorakit.add_adapter(lora_llama, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), name="new")  # loaded
    seqs, rows = [START + [2], START + [4], START + [6]], ["all", "qv", None]
    logits = engine.prefill(seqs, rows)
    assert engine.prefix.hit_tokens == 2 * len(START)  # "qv" and the base rows reuse theirs; "all" recomputes
    _check_rows(lora_llama, engine, logits, seqs, rows, steps=1)
    lorakit.delete_adapter(lora_llama, "qv")
    engine.reset()
    engine.prefill([START + [7]], [None])
    assert {e.adapter for e in engine.prefix._entries.values()} == {"all", None}


def test_merged_base_weights_empty_the_cache(lora_llama):
    engine = DecodeEngine(lora_llama, max_batch=1, max_len=32)
    engine.prefill([START + [1]], [None])
    engine.reset()
    lorakit.set_adapter(lora_llama, "all")
    lorakit.merge(lora_llama, "all")  # the base rows now compute with "all" merged in
    logits = engine.prefill([START + [2]], [None])
    assert engine.prefix.hit_tokens == 0
    with torch.no_grad():
        want = lora_llama(torch.tensor([START + [2]])).logits[0, -1]
    torch.testing.assert_close(logits[0], want, atol=2e-4, rtol=1e-4)


def test_cache_keeps_the_longest_entries_within_its_budget_least_recently_used_out():
    per_token = 2 * 2 * 4 * 4  # (layers 2, heads 1, D 4) fp32 keys and values per token
    cache = PrefixCache(budget_bytes=10 * per_token)

    def add(adapter, tokens):
        kv = torch.arange(2 * len(tokens) * 4, dtype=torch.float32).reshape(2, 1, len(tokens), 4)
        cache.add(adapter, (1,), tokens, kv, -kv)

    add("a", [1, 2, 3])
    add("a", [1, 2, 3, 4, 5])  # extends the first entry, which goes
    assert len(cache) == 1 and cache.nbytes == 5 * per_token
    add("a", [1, 2])  # already held by the longer entry
    add("b", [1, 2, 3])  # another adapter: its own entry
    assert len(cache) == 2
    assert cache.match("a", [1, 2, 3, 9]) == (3, cache.match("a", [1, 2, 3, 9])[1])
    n, entry = cache.match("a", [1, 2, 3, 4, 5])
    assert n == 4 and entry.tokens == (1, 2, 3, 4, 5)  # the last token is always left to compute
    torch.testing.assert_close(entry.values, -entry.keys)
    assert cache.match("b", [1, 2, 3, 4])[0] == 3 and cache.match(None, [1, 2, 3, 4]) == (0, None)
    add("c", [7, 8, 9])  # 5 + 3 + 3 tokens > 10: the least recently used entry ("a", matched before "b") goes
    assert cache.match("a", [1, 2, 3, 4])[0] == 0 and cache.match("b", [1, 2, 3, 4])[0] == 3
    assert cache.nbytes == 6 * per_token <= cache.budget
    add("d", list(range(11)))  # larger than the whole budget: not kept, nothing else dropped
    assert len(cache) == 2
    cache.add(None, (), [4, 4], torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4))
    cache.retain({"b": (2,), "c": (1,)})  # "b" changed since its entry was made: it goes; the base entry stays
    assert cache.match("b", [1, 2, 3, 4])[0] == 0 and cache.match("c", [7, 8, 9, 1])[0] == 3
    assert cache.match(None, [4, 4, 4])[0] == 2 and cache.nbytes == 5 * per_token
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_a_negative_prefix_cache_size_is_refused(lora_llama):
    with pytest.raises(ConfigError, match="prefix_cache_mb must be >= 0"):
        DecodeEngine(lora_llama, max_batch=1, max_len=16, prefix_cache_mb=-1)


def test_a_remembered_row_serves_its_next_turn_unless_an_adapter_changed_meanwhile(lora_llama):
    engine = DecodeEngine(lora_llama, max_batch=2, max_len=48)
    tokens = engine.prefill([START, START[:3]], ["all", "qv"]).argmax(-1)
    answers = [[int(t)] for t in tokens]
    for _ in range(3):
        tokens = engine.decode(tokens).argmax(-1)
        for a, t in zip(answers, tokens.tolist()):
            a.append(t)
    with pytest.raises(ValueError, match="holds 13 tokens, 12 given"):
        engine.remember(0, START + answers[0][:2])
    engine.remember(0, START + answers[0])  # the cache holds START and the first 3 answer tokens
    lorakit.add_adapter(lora_llama, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), name="other")
    engine.sync_adapters()  # a model change between steps (the server does this after loading an adapter)
    engine.remember(1, START[:3] + answers[1])  # born before the change: its keys/values are not offered
    engine.reset()
    turn = START + answers[0] + [11, 12]
    logits = engine.prefill([turn, START[:3] + answers[1] + [13]], ["all", "qv"])
    assert engine.prefix.hit_tokens == len(START) + 3 + 3  # row 2 reuses only its 3 prompt tokens
    _check_rows(lora_llama, engine, logits, [turn, START[:3] + answers[1] + [13]], ["all", "qv"], steps=1)


def test_common_start_equals_the_token_by_token_count():
    gen = torch.Generator().manual_seed(7)
    for _ in range(500):
        n, m = torch.randint(0, 40, (2,), generator=gen).tolist()
        a = torch.randint(0, 3, (n,), generator=gen).tolist()  # 3 symbols: long shared starts are common
        b = a[: torch.randint(0, n + 1, (1,), generator=gen).item()] + torch.randint(0, 3, (m,), generator=gen).tolist()
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_start(a, b) == want == common_start(b, a)
