"""Each finding of issue #11 ("found by trying it") as a test against a real server on loopback.

Several tests hold the scheduler at a gate (`Batcher.call` runs a callable on the scheduler thread between steps)
so that requests are provably batched together: they all wait in the queue, then are admitted in one group.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from serve_helpers import running_server, slow_down, solo_greedy

from lorakit.cli import main
from lorakit.serve.metrics import Metrics
from lorakit.serve.protocol import encode_prompt

PROMPT = "Once upon a time"


def _complete(url: str, model: str, **body) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body}
    return httpx.post(url + "/v1/completions", json=body, timeout=30)


def _wait(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


class Gate:
    """Holds the scheduler thread until `open`; requests submitted meanwhile wait in the queue together.

    Adapter loads also run on the scheduler thread: make the adapters resident before closing the gate.
    """

    def __init__(self, state) -> None:
        self.event = threading.Event()
        self.future = state.batcher.call(lambda: self.event.wait(30))

    def open(self) -> None:
        self.event.set()
        self.future.result(30)


def _solo(state, tiny_serve_dir, adapters, model: str, max_tokens: int = 6) -> str:
    ids = encode_prompt(state.tokenizer, PROMPT)
    return solo_greedy(tiny_serve_dir, adapters, [(None if model == "tiny" else model, ids, max_tokens)])[0]


def _poison(state, name: str, value: float = float("nan")) -> None:
    """Make adapter ``name`` (resident) produce non-finite logits: one of its B matrices is filled with ``value``."""
    for module in state.model.modules():
        if hasattr(module, "lora_B") and name in module.lora_B:
            with torch.no_grad():
                module.lora_B[name].weight.fill_(value)
            return
    raise AssertionError(f"{name} is not resident")


# ---- confinement -----------------------------------------------------------------------------------------------
def test_the_api_cannot_load_adapters_from_outside_the_adapters_folder(tiny_serve_dir, fresh_adapters, tmp_path):
    import shutil

    outside = shutil.copytree(fresh_adapters / "a0", tmp_path / "elsewhere")
    (tmp_path / "secret_file_name.txt").write_text("x")
    with running_server(tiny_serve_dir, fresh_adapters) as (url, _):
        for body in (
            {"name": "x", "path": str(outside)},
            {"name": "x", "path": "../elsewhere"},
            {"name": "x", "path": str(tmp_path)},
            {"name": "/etc"},
            {"name": "../elsewhere"},
            {"name": ".hidden"},
            {"name": "a" * 200},
        ):
            r = httpx.post(url + "/v1/adapters", json=body, timeout=30)
            assert r.status_code in (400, 403), (body, r.text)
            assert "secret_file_name" not in r.text and "passwd" not in r.text
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert "x" not in models
        r = httpx.post(url + "/v1/adapters", json={"name": "copy", "path": "a0"}, timeout=30)
        assert r.status_code == 200, r.text  # a folder inside the adapters folder is fine


# ---- a scheduler that cannot die -------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [6e-38, 1e-45])  # the value; one that overflows any model's logits
def test_a_tiny_temperature_answers_like_greedy_and_releases_its_pin(
    tiny_serve_dir, adapters_dir, temperature, weights
):
    with running_server(tiny_serve_dir, adapters_dir, max_tokens=64, weights=weights) as (url, state):
        r = _complete(url, "a1", temperature=temperature, max_tokens=12)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == _solo(state, tiny_serve_dir, adapters_dir, "a1", 12)
        assert httpx.delete(url + "/v1/adapters/a1", timeout=30).status_code == 200
        assert httpx.get(url + "/health").json()["status"] == "ok"
        assert _complete(url, "a0").status_code == 200


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_nan_logits_fail_that_request_alone_mid_decode(tiny_serve_dir, adapters_dir, temperature, weights):
    with running_server(tiny_serve_dir, adapters_dir, max_tokens=64, weights=weights) as (url, state):
        assert _complete(url, "a1").status_code == 200  # a1 resident
        slow_down(state, 0.01)
        with ThreadPoolExecutor(2) as pool:
            innocent = pool.submit(_complete, url, "a0", max_tokens=20)
            _wait(lambda: state.batcher.running == 1)
            bad = pool.submit(_complete, url, "a1", max_tokens=20, temperature=temperature)
            _wait(lambda: state.batcher.running == 2 or bad.done())
            state.batcher.call(lambda: _poison(state, "a1")).result(10)
            r_bad, r_ok = bad.result(30), innocent.result(30)
        assert r_bad.status_code == 500 and "NaN" in r_bad.json()["error"]["message"], r_bad.text
        assert r_ok.status_code == 200
        assert r_ok.json()["choices"][0]["text"] == _solo(state, tiny_serve_dir, adapters_dir, "a0", 20)
        assert state.registry._pins == {}
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_a_request_failing_at_its_first_token_does_not_fail_its_prefill_mate(tiny_serve_dir, adapters_dir, weights):
    with running_server(tiny_serve_dir, adapters_dir, weights=weights) as (url, state):
        assert _complete(url, "a1").status_code == 200 and _complete(url, "a0").status_code == 200  # resident
        _poison(state, "a1", float("inf"))
        gate = Gate(state)
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(_complete, url, "a1")
            ok = pool.submit(_complete, url, "a0")
            _wait(lambda: state.batcher.queue_depth == 2)
            gate.open()
            r_bad, r_ok = bad.result(30), ok.result(30)
        assert r_bad.status_code == 500 and "generation failed" in r_bad.json()["error"]["message"]
        assert r_ok.status_code == 200, r_ok.text
        assert r_ok.json()["choices"][0]["text"] == _solo(state, tiny_serve_dir, adapters_dir, "a0")


def test_out_of_vocabulary_prompt_ids_are_refused_and_do_not_hurt_batch_mates(tiny_serve_dir, adapters_dir, weights):
    with running_server(tiny_serve_dir, adapters_dir, weights=weights) as (url, state):
        vocab = state.model.get_input_embeddings().weight.shape[0]
        assert _complete(url, "a0").status_code == 200  # resident: its load does not wait behind the gate
        gate = Gate(state)
        with ThreadPoolExecutor(2) as pool:
            ok = pool.submit(_complete, url, "a0")
            _wait(lambda: state.batcher.queue_depth == 1)
            bad = pool.submit(_complete, url, "tiny", prompt=[1, vocab + 5])
            _wait(lambda: state.batcher.queue_depth == 2 or bad.done())
            gate.open()
            r_bad, r_ok = bad.result(30), ok.result(30)
        assert r_bad.status_code == 400 and str(vocab + 5) in r_bad.json()["error"]["message"]
        assert _complete(url, "tiny", prompt=[-1]).status_code == 400
        assert r_ok.status_code == 200, r_ok.text


# ---- limits ----------------------------------------------------------------------------------------------------
def test_body_prompts_stops_and_queue_are_bounded(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, max_queue=4) as (url, state):
        huge = b'{"model": "tiny", "prompt": "' + b"x" * (2 << 20) + b'"}'
        r = httpx.post(url + "/v1/completions", content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
        assert _complete(url, "tiny", prompt=["hi"] * 1000).status_code == 400
        assert _complete(url, "tiny", stop=["a", "b", "c", "d", "e"]).status_code == 400
        assert _complete(url, "tiny", stop=["x" * 100_000]).status_code == 400
        gate = Gate(state)
        with ThreadPoolExecutor(8) as pool:
            waiting = [pool.submit(_complete, url, "tiny") for _ in range(state.limits.max_queue)]
            _wait(lambda: state.batcher.queue_depth == state.limits.max_queue)
            full = _complete(url, "tiny")
            gate.open()
            assert all(w.result(30).status_code == 200 for w in waiting)
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1


def test_the_metrics_window_is_bounded():
    metrics = Metrics(window_s=10.0)
    for _ in range(20_000):
        metrics.tokens(1)
    assert len(metrics._recent) <= 128
    assert metrics.generated_total == 20_000


def test_failed_adapter_bookkeeping_is_bounded(tiny_serve_dir, fresh_adapters, monkeypatch):
    from lorakit.serve.registry import AdapterRegistry

    monkeypatch.setattr(AdapterRegistry, "MAX_FAILED", 8)
    (fresh_adapters / "broken").mkdir()
    (fresh_adapters / "broken" / "adapter_config.json").write_text("{not json")
    with running_server(tiny_serve_dir, fresh_adapters) as (url, state):
        for i in range(30):
            r = httpx.post(url + "/v1/adapters", json={"name": f"bad{i}", "path": "broken"}, timeout=30)
            assert r.status_code == 400
        assert len(state.registry._failed) <= 8 and len(state.registry._load_locks) <= 8 + 8


# ---- what is listed --------------------------------------------------------------------------------------------
def test_a_corrupt_adapter_is_not_listed_as_servable(tiny_serve_dir, fresh_adapters):
    weights = fresh_adapters / "a5" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with running_server(tiny_serve_dir, fresh_adapters) as (url, _):
        assert "a5" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        listed = {a["id"]: a for a in httpx.get(url + "/v1/adapters").json()["data"]}
        assert listed["a5"]["status"] == "error" and "safetensors" in listed["a5"]["error"]
        assert listed["a0"]["status"] == "ok" and listed["a0"]["error"] is None


# ---- python 3.10, the CLI --------------------------------------------------------------------------------------
def test_slow_tokens_do_not_fail_non_streamed_requests(tiny_serve_dir, adapters_dir):
    """On Python 3.10 `asyncio.wait_for` raises `asyncio.TimeoutError`, not the builtin: gaps >= 0.25 s gave 500."""
    with running_server(tiny_serve_dir, adapters_dir) as (url, state):
        slow_down(state, 0.3)
        assert _complete(url, "tiny", max_tokens=2).status_code == 200


def test_serve_threads_zero_is_one_error_line(capsys):
    assert main(["serve", "--threads", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: --threads") and err.count("\n") == 1


# ---- the loop stopping -----------------------------------------------------------------------------------------
def test_if_the_scheduler_stops_health_is_503_and_waiters_fail_at_once(tiny_serve_dir, adapters_dir, weights):
    with running_server(tiny_serve_dir, adapters_dir, weights=weights) as (url, state):
        assert _complete(url, "a0").status_code == 200  # resident: its load does not wait behind the gate
        gate = Gate(state)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_complete, url, "a0")
            _wait(lambda: state.batcher.queue_depth == 1)

            def broken() -> None:
                raise RuntimeError("injected scheduler fault")

            state.batcher._drop_cancelled = broken
            gate.open()
            r = waiting.result(10)
        assert r.status_code == 503 and "injected scheduler fault" in r.json()["error"]["message"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert _complete(url, "tiny").status_code == 503
        assert state.registry._pins == {}
