"""A bounded soak of a real server (tiny random model): 32 clients, a fixed mix of valid, invalid, cancelled,
unknown-adapter and adapter load/delete traffic. Every valid answer equals its solo greedy answer, no adapter pin
is left, the server is healthy after, and RSS grows less than `RSS_BOUND_MIB` after the warm-up round.

The bigger run by hand: ``python benchmarks/soak_serve.py`` (writes benchmarks/results/serve_soak.json)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
from serve_helpers import running_server

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from soak_serve import Plan, soak, solo_answers  # noqa: E402

RSS_BOUND_MIB = 64
KEY = "sk-soak-test-key"


def test_soak_32_clients_mixed_traffic(tiny_serve_dir, fresh_adapters):
    import psutil

    from lorakit.serve.auth import Keys

    process = psutil.Process(os.getpid())
    plan = Plan(clients=32, requests=256, max_tokens=6, headers={"Authorization": f"Bearer {KEY}"})
    with running_server(tiny_serve_dir, fresh_adapters, keys=Keys(api=(KEY,)), max_batch_size=8) as (url, state):
        result = soak(url, plan, rss=lambda: process.memory_info().rss)
        deadline = time.monotonic() + 10
        while (state.batcher.running or state.batcher.queue_depth) and time.monotonic() < deadline:
            time.sleep(0.01)  # cancelled streams end at the scheduler's next step
        assert state.registry._pins == {}
        assert httpx.get(url + "/health").json()["status"] == "ok"
    outcomes = result["outcomes"]
    assert set(outcomes) <= {"valid 200", "stream 200", "cancel 200", "invalid 400", "unknown 404",
                             "admin 200/200", "admin 200/409", "admin 200/404"}, outcomes  # fmt: skip
    assert outcomes["valid 200"] + outcomes["stream 200"] == len(result["answers"]) > 80
    jobs = [job for job, _ in result["answers"]]
    expected = solo_answers(tiny_serve_dir, fresh_adapters, jobs)
    wrong = [(job, text, want) for (job, text), want in zip(result["answers"], expected) if text != want]
    assert not wrong, wrong[:3]
    growth = (result["rss_end"] - result["rss_after_warmup"]) / 2**20
    assert growth < RSS_BOUND_MIB, f"RSS grew {growth:.1f} MiB after the warm-up"
