"""The captured decode step (`lorakit.inference.graphs`) on the CPU: the static step a CUDA graph replays, run
eagerly from its static buffers (``capture=False``), must give what the eager engine gives, re-keyed whenever
the batch shape, the cache or the adapters change. Real capture needs CUDA: benchmarks/bench_decode_cuda.py
checks it there (greedy tokens equal with and without graphs)."""

from __future__ import annotations

import pytest
import torch
from decode_helpers import prompts

import lorakit
from lorakit.errors import ConfigError
from lorakit.inference import DecodeEngine
from lorakit.inference.generate import run_engine
from lorakit.inference.graphs import DecodeGraphs
from lorakit.inference.reference import reference_generate


def _static_engine(model, **kwargs) -> DecodeEngine:
    engine = DecodeEngine(model, **kwargs)
    engine.graphs = DecodeGraphs(engine, capture=False)
    return engine


def test_static_step_logits_equal_the_eager_step(lora_llama):
    rows = ["qv", None, "all", "mlp"]
    ids = prompts(4)
    eager, static = DecodeEngine(lora_llama, max_batch=4, max_len=40), _static_engine(lora_llama, max_batch=4,
                                                                                      max_len=40)  # fmt: skip
    a, b = eager.prefill(ids, rows), static.prefill(ids, rows)
    for step in range(6):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        tokens = a.argmax(-1)
        if step == 3:  # rows leave: a new batch shape, a new static step
            eager.keep([2, 0])
            static.keep([2, 0])
            tokens = tokens[[2, 0]]
        a, b = eager.decode(tokens), static.decode(tokens)
    assert static.graphs.captures == 2  # 4 rows, then 2


def test_greedy_tokens_equal_model_generate_with_rows_joining_and_mixes_changing(lora_llama):
    rows = ["qv", "all", None, "mlp", "all", "qv", None, "mlp", "qv"]
    ids = prompts(9, seed=3)
    engine = _static_engine(lora_llama, max_batch=3, max_len=40)  # rows join mid-way: the mix changes often
    got = run_engine(engine, ids, rows, max_new_tokens=12, stops={7, 42})
    assert got == reference_generate(lora_llama, ids, rows, 12, [7, 42])
    # the same shapes came back with other adapters on the rows: their masks were copied in, not re-captured
    assert engine.graphs.captures < sum(len(t) for t in got)


def test_mask_values_are_copied_into_the_static_step(lora_llama):
    engine = _static_engine(lora_llama, max_batch=3, max_len=40)
    ids = prompts(3, seed=4)
    first_rows, second_rows = ["qv", "all", "qv"], ["qv", "all", "all"]  # same adapters in the same order
    first = run_engine(engine, ids, first_rows, 6, set())
    captured = engine.graphs.captures
    second = run_engine(engine, ids, second_rows, 6, set())  # same key (layout, shapes), other rows' masks
    assert engine.graphs.captures == captured
    assert second == reference_generate(lora_llama, ids, second_rows, 6, [])
    assert first == reference_generate(lora_llama, ids, first_rows, 6, [])


def test_trained_adapter_and_merged_base_are_recaptured(lora_llama):
    engine = _static_engine(lora_llama, max_batch=2, max_len=24)
    ids = prompts(2, seed=5)
    before = run_engine(engine, ids, ["all", "all"], 8, set())
    captured = engine.graphs.captures
    with torch.no_grad():  # as a training step would
        for t in lorakit.adapter_state_dict(lora_llama, "all").values():
            t.mul_(-1.5)
    after = run_engine(engine, ids, ["all", "all"], 8, set())
    assert after == reference_generate(lora_llama, ids, ["all", "all"], 8, [])
    assert after != before and engine.graphs.captures > captured
    captured = engine.graphs.captures
    with torch.no_grad():  # base weights change in place (as a merge does): packed again, captured again
        lora_llama.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    merged = run_engine(engine, ids, [None, "qv"], 8, set())
    assert merged == reference_generate(lora_llama, ids, [None, "qv"], 8, [])
    assert engine.graphs.captures > captured


def test_cache_growth_drops_the_graphs_of_the_old_cache(lora_llama):
    engine = _static_engine(lora_llama, max_batch=1, max_len=128)
    engine.prefill([[1, 2, 3]], ["qv"])
    engine._reserve(engine.keys.shape[3])  # no growth: kept
    engine.decode(torch.tensor([5]))
    assert len(engine.graphs.steps) == 1
    engine._reserve(engine.keys.shape[3] + 1)
    assert len(engine.graphs.steps) == 0


def test_lru_keeps_the_last_limit_steps(lora_llama):
    engine = DecodeEngine(lora_llama, max_batch=3, max_len=40)
    engine.graphs = DecodeGraphs(engine, capture=False, limit=2)
    ids, rows = prompts(3, seed=6), ["qv", "all", "mlp"]
    for n in (1, 2, 3, 1):  # three batch shapes through two places: the 1-row step was evicted, then re-made
        engine.reset()
        logits = engine.prefill(ids[:n], rows[:n])
        engine.decode(logits.argmax(-1))
    assert engine.graphs.captures == 4
    assert [key[0] for key in engine.graphs.steps] == [3, 1]


def test_cuda_graphs_on_a_cpu_model_is_a_clear_error(lora_llama):
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA model"):
        DecodeEngine(lora_llama, max_batch=1, max_len=16, cuda_graphs=True)
    assert DecodeEngine(lora_llama, max_batch=1, max_len=16).graphs is None  # default: off on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graph capture needs a CUDA device")
def test_captured_graphs_on_cuda_equal_eager_and_model_generate(lora_llama):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = lora_llama.cuda()
    rows = ["qv", "all", None, "mlp", "all", "qv", None, "mlp", "qv"]
    ids = prompts(9, seed=3)
    graphs = DecodeEngine(model, max_batch=3, max_len=40)
    assert graphs.graphs is not None and graphs.graphs.capture  # on by default on CUDA
    eager = DecodeEngine(model, max_batch=3, max_len=40, cuda_graphs=False)
    got = run_engine(graphs, ids, rows, max_new_tokens=12, stops={7, 42})
    assert graphs.graphs is not None and graphs.graphs.captures > 0  # captured, not fallen back to eager
    assert got == run_engine(eager, ids, rows, max_new_tokens=12, stops={7, 42})
    assert got == reference_generate(model, ids, rows, 12, [7, 42])
    logits_eager = eager.prefill(ids[:3], rows[:3])
    logits_graph = graphs.prefill(ids[:3], rows[:3])
    for _ in range(4):
        tokens = logits_eager.argmax(-1)
        logits_eager, logits_graph = eager.decode(tokens), graphs.decode(tokens)
        torch.testing.assert_close(logits_graph, logits_eager, atol=1e-4, rtol=1e-4)


def test_a_failed_capture_falls_back_to_the_eager_step(lora_llama, monkeypatch, caplog):
    engine = _static_engine(lora_llama, max_batch=2, max_len=40)

    def cannot_capture(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine.graphs.capture = True  # the recording path, with the recording itself failing as on a real device
    monkeypatch.setattr(engine.graphs, "_capture", cannot_capture)
    ids = prompts(2, seed=8)
    with caplog.at_level("WARNING", logger="lorakit.inference.engine"):
        got = run_engine(engine, ids, ["qv", "all"], 8, set())
    assert engine.graphs is None and "decoding without graphs" in caplog.text
    assert got == reference_generate(lora_llama, ids, ["qv", "all"], 8, [])


def test_a_failed_replay_is_raised_not_hidden_by_an_eager_retry(lora_llama, monkeypatch):
    engine = _static_engine(lora_llama, max_batch=2, max_len=40)
    logits = engine.prefill(prompts(2, seed=9), ["qv", "all"])
    engine.decode(logits.argmax(-1))  # recorded (the stand-in's static step)
    graphs = engine.graphs
    step = next(iter(graphs.steps.values()))

    def replay_fails():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(step, "run", replay_fails)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.decode(logits.argmax(-1))
    assert engine.graphs is graphs  # not switched off: the error is the caller's to see
