"""Continuous mixed-adapter batching on a real server: concurrent requests for different adapters share decode
steps yet each answer equals running it alone; a client that disconnects frees its slot; a bounded load test."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import psutil
import pytest
from serve_helpers import running_server, slow_down, solo_greedy

from lorakit.inference.prefix import common_start
from lorakit.serve.protocol import encode_prompt

ADAPTERS = [f"a{i}" for i in range(8)]
PROMPTS = [
    "Once upon a time",
    "The quick brown fox jumps over the lazy dog because",
    "Q: what is two plus two?\nA:",
    "def fibonacci(n):",
    "In 1492",
    "Lists of prime numbers: 2, 3, 5, 7,",
    "Dear diary, today",
    "The weather in Paris is usually mild in spring, and",
]


def _metric(text: str, name: str, missing: float | None = None) -> float:
    """The value of one sample; a sample that is not there fails the test unless ``missing`` gives its value
    (counters with a label value that has not happened yet are left out of /metrics)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    if match is None:
        assert missing is not None, f"{name} is missing from /metrics:\n{text}"
        return missing
    return float(match.group(1))


async def _complete_all(url: str, jobs: list[tuple[str | None, str, int]], clients: int) -> list[dict]:
    """Send every job (adapter, prompt, max_tokens) with at most ``clients`` in flight; answers in job order."""
    limit = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as client:

        async def one(adapter, prompt, max_tokens):
            async with limit:
                body = {"model": adapter or "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                r = await client.post(url + "/v1/completions", json=body)
                return {"status": r.status_code, **r.json()}

        return await asyncio.gather(*(one(*job) for job in jobs))


def test_mixed_adapter_batch_outputs_equal_solo_greedy_outputs(tiny_serve_dir, adapters_dir, weights):
    # different prompt lengths and max_tokens: requests join and leave the running batch at different steps
    jobs = [([None, *ADAPTERS][i % 9], PROMPTS[i % len(PROMPTS)], 4 + (i * 5) % 13) for i in range(18)]
    with running_server(tiny_serve_dir, adapters_dir, max_batch_size=6, weights=weights) as (url, state):
        answers = asyncio.run(_complete_all(url, jobs, clients=18))
        metrics = httpx.get(url + "/metrics").text
        requests = [(a, encode_prompt(state.tokenizer, p), n) for a, p, n in jobs]
    expected = solo_greedy(tiny_serve_dir, adapters_dir, requests)
    assert [a["choices"][0]["text"] for a in answers] == expected
    steps, rows = _metric(metrics, "lorakit_batch_size_count"), _metric(metrics, "lorakit_batch_size_sum")
    assert rows / steps > 2, "decode steps should have run several requests together"
    assert _metric(metrics, 'lorakit_batch_size_bucket{le="4"}') < steps  # some steps had 5-6 rows


def test_a_client_disconnecting_mid_stream_frees_its_slot(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, max_batch_size=1) as (url, state):
        slow_down(state, 0.02)  # 200 tokens take >= 4 s: the hang-up surely comes first
        body = {"model": "a1", "prompt": "Tell me a story", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            received = [next(lines) for _ in range(4)]  # a few events, then hang up
        assert any(line.startswith("data: {") for line in received)
        deadline = time.monotonic() + 10
        while (state.batcher.running or state.registry.resident() and _pinned(state)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.batcher.running == 0 and not _pinned(state)
        metrics = httpx.get(url + "/metrics").text
        assert _metric(metrics, 'lorakit_requests_total{finish_reason="cancelled"}') == 1
        assert 1 <= _metric(metrics, "lorakit_generated_tokens_total") < 200
        # the single slot is free again: the next request is answered
        answer = httpx.post(url + "/v1/completions", json={"model": "a2", "prompt": "x", "max_tokens": 3}, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"


def test_a_non_streaming_client_that_gives_up_frees_its_slot(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, max_batch_size=1) as (url, state):
        slow_down(state, 0.02)
        body = {"model": "a3", "prompt": "Tell me a story", "max_tokens": 200, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        deadline = time.monotonic() + 10
        while (state.batcher.running or _pinned(state)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.batcher.running == 0 and not _pinned(state)
        metrics = httpx.get(url + "/metrics").text
        assert _metric(metrics, 'lorakit_requests_total{finish_reason="cancelled"}') == 1, metrics


def _pinned(state) -> bool:
    return any(state.registry._pins.values())


def test_load_64_concurrent_clients_over_8_adapters(tiny_serve_dir, adapters_dir):
    jobs = [(ADAPTERS[i % 8], PROMPTS[(i // 8) % len(PROMPTS)], 8) for i in range(128)]
    with running_server(tiny_serve_dir, adapters_dir, max_batch_size=16) as (url, state):
        process = psutil.Process()
        warm = asyncio.run(_complete_all(url, jobs[:64], clients=64))  # warm-up: adapters loaded, caches sized
        rss_before = process.memory_info().rss
        start = time.perf_counter()
        answers = asyncio.run(_complete_all(url, jobs, clients=64))
        seconds = time.perf_counter() - start
        rss_after = process.memory_info().rss
        metrics = httpx.get(url + "/metrics").text
        requests = [(a, encode_prompt(state.tokenizer, p), n) for a, p, n in jobs]
    assert all(a["status"] == 200 for a in warm + answers)
    assert all(a["choices"][0]["finish_reason"] == "length" for a in answers)
    expected = solo_greedy(tiny_serve_dir, adapters_dir, requests)
    assert [a["choices"][0]["text"] for a in answers] == expected
    assert _metric(metrics, 'lorakit_requests_total{finish_reason="error"}', missing=0.0) == 0
    assert _metric(metrics, "lorakit_queue_depth") == 0 and _metric(metrics, "lorakit_running_requests") == 0
    growth_mb = (rss_after - rss_before) / 2**20
    assert growth_mb < 64, f"RSS grew by {growth_mb:.0f} MiB over 128 requests"
    print(f"\n128 requests x 8 tokens, 64 clients: {128 * 8 / seconds:.0f} tok/s, RSS +{growth_mb:.1f} MiB")


@pytest.mark.parametrize("stream", [False, True])
def test_requests_queued_beyond_the_batch_size_are_all_answered(tiny_serve_dir, adapters_dir, stream):
    with running_server(tiny_serve_dir, adapters_dir, max_batch_size=2) as (url, _):

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:

                async def one(i):
                    body = {"model": ADAPTERS[i], "prompt": PROMPTS[i], "max_tokens": 5, "stream": stream}
                    r = await client.post(url + "/v1/completions", json=body)
                    return r.text if stream else r.json()["choices"][0]["finish_reason"]

                return await asyncio.gather(*(one(i) for i in range(8)))

        out = asyncio.run(run())
    if stream:
        assert all(o.rstrip().endswith("data: [DONE]") for o in out)
        assert all(json.loads(o.split("data: ")[-2])["choices"][0]["finish_reason"] == "length" for o in out)
    else:
        assert out == ["length"] * 8


def test_requests_that_start_alike_reuse_the_cached_start_and_answer_as_alone(tiny_serve_dir, adapters_dir):
    system = "You are a terse assistant. Answer in one line, no preamble, and never apologise.\n"
    first = [("a1", system + "Q: the capital of France?\nA:", 6), ("a2", system + "Q: two plus two?\nA:", 6)]
    later = [
        ("a1", system + "Q: a colour of the sky?\nA:", 6),
        ("a2", system + "Q: three plus four?\nA:", 6),
        ("a3", system + "Q: the capital of Spain?\nA:", 6),
        ("a1", system + "Q: the capital of France?\nA:", 6),
    ]
    for budget in (256.0, 0.0):
        with running_server(tiny_serve_dir, adapters_dir, max_batch_size=4, prefix_cache_mb=budget) as (url, state):
            answers = asyncio.run(_complete_all(url, first, clients=2))
            answers += asyncio.run(_complete_all(url, later, clients=4))
            cached = _metric(httpx.get(url + "/metrics").text, "lorakit_prompt_tokens_cached_total")
            requests = [(a, encode_prompt(state.tokenizer, p), n) for a, p, n in first + later]
        assert [a["choices"][0]["text"] for a in answers] == solo_greedy(tiny_serve_dir, adapters_dir, requests)
        ids = [r[1] for r in requests]  # a1 and a2 reuse their first prompt's start, a3 has none cached, and the
        reused = common_start(ids[0], ids[2]) + common_start(ids[1], ids[3]) + len(ids[0]) - 1  # repeat: all but 1
        assert common_start(ids[0], ids[2]) > len(encode_prompt(state.tokenizer, system))
        assert cached == (reused if budget else 0)


def test_a_next_turn_reuses_the_finished_answer_from_the_cache(tiny_serve_dir, adapters_dir):
    import torch

    import lorakit

    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    lorakit.load_adapter(model, adapters_dir / "a1", name="a1")
    first = encode_prompt(tokenizer, "Q: the capital of France?\nA:")
    x = torch.tensor([first])
    with torch.no_grad(), lorakit.route(model, ["a1"]):
        answer = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)[
            0, len(first) :
        ]
    following = first + answer.tolist() + encode_prompt(tokenizer, "\nQ: and of Spain?\nA:")
    with running_server(tiny_serve_dir, adapters_dir, max_batch_size=2) as (url, state):
        asyncio.run(_complete_all(url, [("a1", first, 6)], clients=1))
        before = _metric(httpx.get(url + "/metrics").text, "lorakit_prompt_tokens_cached_total")
        [reply] = asyncio.run(_complete_all(url, [("a1", following, 5)], clients=1))
        cached = _metric(httpx.get(url + "/metrics").text, "lorakit_prompt_tokens_cached_total") - before
    assert cached == len(first) + 5  # the prompt and the answer but its last token (never fed back)
    assert reply["choices"][0]["text"] == solo_greedy(tiny_serve_dir, adapters_dir, [("a1", following, 5)])[0]


def test_a_failing_cache_offer_is_logged_and_serving_goes_on(tiny_serve_dir, adapters_dir, caplog):
    with running_server(tiny_serve_dir, adapters_dir, max_batch_size=2) as (url, state):

        def broken(index, tokens):
            raise RuntimeError("cache offer failed")

        state.batcher.engine.engine.remember = broken
        jobs = [("a1", "Once upon a time", 4), ("a2", "In 1492", 3)]
        answers = asyncio.run(_complete_all(url, jobs * 2, clients=2))
        assert state.batcher.alive
    assert [a["status"] for a in answers] == [200] * 4
    assert [a["choices"][0]["finish_reason"] for a in answers] == ["length"] * 4
    assert "offering a finished row to the prefix cache failed" in caplog.text
