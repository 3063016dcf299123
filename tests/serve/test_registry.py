"""Adapter management on a real server: LRU eviction, folders dropped in without a restart, runtime POST/DELETE,
and corrupt or foreign adapters refused with a clear error while every other adapter keeps serving; the order in
which a DELETE and a concurrent re-add queue their model changes (a stand-in scheduler queue, drained by the test)."""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from serve_helpers import running_server, slow_down

import lorakit
from lorakit import LoraConfig
from lorakit.serve.registry import AdapterRegistry


def _complete(url: str, model: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=30)


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_lru_cap_evicts_the_least_recently_used_adapter(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, max_adapters=2) as (url, state):
        first = _text(_complete(url, "a0"))
        for name in ("a1", "a2"):
            _text(_complete(url, name))
        assert state.registry.resident() == ["a1", "a2"]
        assert lorakit.list_adapters(state.model) == ["a1", "a2"]  # a0's tensors are gone from the model
        _text(_complete(url, "a1"))  # a1 becomes the most recently used
        _text(_complete(url, "a3"))
        assert state.registry.resident() == ["a1", "a3"]
        assert _text(_complete(url, "a0")) == first  # reloaded on demand, same answer
        assert "lorakit_resident_adapters 2" in httpx.get(url + "/metrics").text


def test_eviction_when_requests_finish_does_not_deadlock_the_scheduler(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, max_adapters=1, max_batch_size=4) as (url, state):
        slow_down(state, 0.02)  # 30 tokens take > 0.6 s: both requests are in flight together
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(_complete, url, name, 30) for name in ("a0", "a1")]
            deadline = time.monotonic() + 10
            while len(state.registry.resident()) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(state.registry.resident()) == 2  # over the cap while both are in use
            assert all(a.result(timeout=20).status_code == 200 for a in answers)
        # the releases ran on the scheduler thread and evicted down to the cap there, without waiting on itself
        assert len(state.registry.resident()) == 1
        assert _text(_complete(url, "a2"))
        assert lorakit.list_adapters(state.model) == ["a2"]


def test_adapters_dropped_into_the_folder_are_served_without_restart(tiny_serve_dir, fresh_adapters):
    with running_server(tiny_serve_dir, fresh_adapters) as (url, _):
        assert _complete(url, "newcomer").status_code == 404
        shutil.copytree(fresh_adapters / "a3", fresh_adapters / "newcomer")
        assert _text(_complete(url, "newcomer")) == _text(_complete(url, "a3"))
        assert "newcomer" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]


def _foreign_adapter(path) -> None:
    """An adapter made for another base (hidden size 48, not 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))  # fmt: skip
    lorakit.add_adapter(other, LoraConfig(r=2, target_modules=["q_proj"]), name="x")
    lorakit.save_adapter(other, path, name="x")


def test_corrupt_or_foreign_adapters_are_refused_and_the_rest_keep_serving(tiny_serve_dir, fresh_adapters):
    broken = fresh_adapters / "broken"
    shutil.copytree(fresh_adapters / "a0", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    _foreign_adapter(fresh_adapters / "foreign")
    with running_server(tiny_serve_dir, fresh_adapters) as (url, state):
        before = _text(_complete(url, "a0"))
        r = _complete(url, "broken")
        assert r.status_code == 400 and "'broken'" in r.json()["error"]["message"]
        assert "not a valid safetensors file" in r.json()["error"]["message"]
        r = _complete(url, "foreign")
        assert r.status_code == 400 and "'foreign'" in r.json()["error"]["message"], r.text
        assert lorakit.list_adapters(state.model) == ["a0"]  # refused loads left the model as it was
        assert _text(_complete(url, "a0")) == before
        assert _text(_complete(url, "a5"))
        names = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert "broken" not in names and "foreign" not in names and "a5" in names
        shutil.copy(fresh_adapters / "a0" / "adapter_model.safetensors", broken / "adapter_model.safetensors")
        assert _text(_complete(url, "broken")) == before  # fixed on disk: served again, no restart


def test_runtime_post_and_delete_of_adapters(tiny_serve_dir, adapters_dir, tmp_path):
    elsewhere = shutil.copytree(adapters_dir / "a6", tmp_path / "outside")
    with running_server(tiny_serve_dir, adapters_dir, allow_adapter_paths=True) as (url, state):  # trusted clients
        r = httpx.post(url + "/v1/adapters", json={"name": "extra", "path": str(elsewhere)})
        assert r.status_code == 200 and r.json()["id"] == "extra"
        assert "extra" in state.registry.resident()
        assert _text(_complete(url, "extra")) == _text(_complete(url, "a6"))
        assert httpx.delete(url + "/v1/adapters/extra").status_code == 200
        assert "extra" not in lorakit.list_adapters(state.model)
        assert _complete(url, "extra").status_code == 404
        assert httpx.delete(url + "/v1/adapters/extra").status_code == 404
        assert httpx.delete(url + "/v1/adapters/a6").status_code == 200  # a folder of DIR: unserved until re-added
        assert _complete(url, "a6").status_code == 404
        assert httpx.post(url + "/v1/adapters", json={"name": "a6"}).status_code == 200
        assert _complete(url, "a6").status_code == 200
        r = httpx.post(url + "/v1/adapters", json={"name": "bad", "path": str(tmp_path / "missing")})
        assert r.status_code == 400 and "is not an adapter folder" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/adapters", json={"name": "bad.name", "path": str(elsewhere)}).status_code == 400
        assert httpx.post(url + "/v1/adapters", json={"path": str(elsewhere)}).status_code == 400


def test_deleting_an_adapter_in_use_is_refused_until_its_requests_end(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir) as (url, state):
        _text(_complete(url, "a2"))  # resident now
        gate = threading.Event()
        state.batcher.call(gate.wait)  # hold the scheduler between steps: the next request stays queued
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_complete, url, "a2")
            deadline = time.monotonic() + 10
            while state.batcher.queue_depth == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            busy = httpx.delete(url + "/v1/adapters/a2")
            gate.set()
            assert pending.result().status_code == 200
        assert busy.status_code == 409 and "in use by 1 request" in busy.json()["error"]["message"]
        assert httpx.delete(url + "/v1/adapters/a2").status_code == 200


def test_registry_pins_keep_in_use_adapters_resident_over_the_cap(tiny_llama, tmp_path):
    for name in ("x", "y"):
        lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), name=name)
        lorakit.save_adapter(tiny_llama, tmp_path / name, name=name)
        lorakit.delete_adapter(tiny_llama, name)
    registry = AdapterRegistry(tiny_llama, tmp_path, max_adapters=1)
    registry.acquire("x")
    registry.acquire("y")  # x is pinned: the cap is exceeded rather than evicting an adapter in use
    assert registry.resident() == ["x", "y"]
    registry.release("x")
    assert registry.resident() == ["y"] and lorakit.list_adapters(tiny_llama) == ["y"]
    with torch.no_grad(), lorakit.route(tiny_llama, ["y"]):
        tiny_llama(torch.zeros(1, 3, dtype=torch.long))


class _Scheduler:
    """A stand-in for the scheduler thread's queue: model changes run in submission order when `drain` says.

    Records whether the registry lock was held when each change was queued (the fix for the DELETE/re-add race:
    an unload queued after the lock is released lets a concurrent re-add queue its load first, which then finds
    the old copy still loaded).
    """

    def __init__(self) -> None:
        self.registry: AdapterRegistry | None = None
        self.queue: list = []
        self.queued_under_lock: list[bool] = []
        self.hold = False
        self.changed = threading.Condition()

    def __call__(self, fn):
        from concurrent.futures import Future

        future: Future = Future()
        self.queued_under_lock.append(self.registry._lock.locked())
        if not self.hold:
            future.set_result(fn())
            return future
        with self.changed:
            self.queue.append((fn, future))
            self.changed.notify_all()
        return future

    def wait_for(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.queue) >= n, timeout=30), f"{len(self.queue)} queued"

    def drain(self) -> None:
        for fn, future in self.queue:
            future.set_result(fn())
        self.queue.clear()


def _registry_with(tiny_llama, tmp_path, names, **kwargs) -> tuple[AdapterRegistry, _Scheduler]:
    for name in names:
        lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), name=name)
        lorakit.save_adapter(tiny_llama, tmp_path / name, name=name)
        lorakit.delete_adapter(tiny_llama, name)
    scheduler = _Scheduler()
    registry = AdapterRegistry(tiny_llama, tmp_path, run_on_model=scheduler, **kwargs)
    scheduler.registry = registry
    return registry, scheduler


def test_delete_then_re_add_queues_the_unload_before_the_load(tiny_llama, tmp_path):
    registry, scheduler = _registry_with(tiny_llama, tmp_path, ["x"])
    registry.add("x")
    scheduler.hold = True  # the scheduler is busy: model changes wait in its queue
    with ThreadPoolExecutor(2) as pool:
        removed = pool.submit(registry.remove, "x")
        scheduler.wait_for(1)  # the unload is queued; the DELETE waits for it
        added = pool.submit(registry.add, "x")
        scheduler.wait_for(2)  # the re-add's load queued behind it
        scheduler.drain()  # in queue order: unload, then load
        removed.result(timeout=30)
        added.result(timeout=30)
    assert scheduler.queued_under_lock[-2:] == [True, False]  # the unload under the lock; the load after it
    assert registry.resident() == ["x"] and lorakit.list_adapters(tiny_llama) == ["x"]


def test_eviction_queues_its_unload_under_the_registry_lock(tiny_llama, tmp_path):
    registry, scheduler = _registry_with(tiny_llama, tmp_path, ["x", "y"], max_adapters=1)
    registry.acquire("x")
    registry.release("x")
    registry.acquire("y")  # x is evicted: its unload is queued under the lock, like a DELETE's
    registry.release("y")
    assert scheduler.queued_under_lock == [False, False, True]  # load x, load y, unload x
    assert registry.resident() == ["y"] and lorakit.list_adapters(tiny_llama) == ["y"]
