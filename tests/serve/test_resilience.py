"""The scheduler without HTTP, under faults injected into one request: its batch-mates finish with their solo greedy
answers, every request's `on_done` (the adapter pin release) runs once, and the scheduler keeps serving. Each test
runs on both model steps (the ``weights`` fixture: the reference path and the fast engine)."""

from __future__ import annotations

import threading

import torch
from serve_helpers import solo_greedy

import lorakit
from lorakit.layers import LoraLayer
from lorakit.routing import current_route
from lorakit.serve.batcher import Batcher, GenRequest
from lorakit.serve.sampling import SamplingParams, choose_token, make_generator


class _Collector:
    def __init__(self) -> None:
        self.text, self.reason, self.error, self.done = "", None, None, threading.Event()
        self.events, self.released = 0, 0

    def __call__(self, event) -> None:
        self.events += 1
        self.text += event.text
        if event.finish_reason:
            self.reason, self.error = event.finish_reason, event.error
            self.done.set()

    def release(self) -> None:
        self.released += 1


def _setup(tiny_serve_dir, adapters_dir, names=("a0", "a1")):
    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    for name in names:
        lorakit.load_adapter(model, adapters_dir / name, name=name)
    ids = tokenizer("Once upon a time").input_ids
    return model, tokenizer, ids


def _request(ids, adapter, collector, on_event=None, max_tokens=12):
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return GenRequest(ids, adapter, params, on_event or collector, collector.release)


def _run(batcher: Batcher, collectors) -> None:
    batcher.start()
    try:
        assert all(c.done.wait(30) for c in collectors)
    finally:
        batcher.close()


def _inject_fault(model, batcher: Batcher, armed: threading.Event) -> None:
    """Once ``armed``, every forward pass with a1 in the batch raises in the last layer (earlier ones wrote k/v)."""
    if batcher.engine is None:
        layer = [m for m in model.modules() if isinstance(m, LoraLayer)][-1]
        forward = layer.forward

        def faulty(x, *args, **kwargs):
            route = current_route()
            if armed.is_set() and route is not None and "a1" in route.rows:
                raise RuntimeError("injected adapter fault")
            return forward(x, *args, **kwargs)

        layer.forward = faulty
        return
    engine = batcher.engine.engine
    last = engine.blocks[-1]  # its projections run on every path (prefill, decode, the CPU's fused decode)
    run_linear = last.linear

    def faulty_linear(key, x):
        if armed.is_set() and "a1" in engine.rows:
            raise RuntimeError("injected adapter fault")
        return run_linear(key, x)

    last.linear = faulty_linear


def test_an_adapter_failing_mid_batch_fails_only_its_request(tiny_serve_dir, adapters_dir, weights):
    model, tokenizer, ids = _setup(tiny_serve_dir, adapters_dir)
    armed = threading.Event()
    batcher = Batcher(model, tokenizer, max_batch_size=4, weights=weights)
    _inject_fault(model, batcher, armed)
    good, bad = _Collector(), _Collector()
    arm_after = bad.__call__

    def arm(event):  # after a1's third token, every forward pass with a1 in the batch raises
        arm_after(event)
        if bad.events == 3:
            armed.set()

    batcher.submit(_request(ids, "a0", good))
    batcher.submit(_request(ids, "a1", bad, arm))
    _run(batcher, [good, bad])
    assert bad.reason == "error" and "injected adapter fault" in bad.error
    assert good.reason == "length" and good.text == solo_greedy(tiny_serve_dir, adapters_dir, [("a0", ids, 12)])[0]
    assert (good.released, bad.released) == (1, 1)


def test_a_raising_callback_fails_only_its_request(tiny_serve_dir, adapters_dir, weights):
    model, tokenizer, ids = _setup(tiny_serve_dir, adapters_dir)
    good, bad = _Collector(), _Collector()

    def explode(event):
        bad(event)
        if bad.events == 2:
            raise RuntimeError("the client's callback broke")

    batcher = Batcher(model, tokenizer, max_batch_size=4, weights=weights)
    batcher.submit(_request(ids, "a0", good))
    batcher.submit(_request(ids, "a1", bad, explode))
    _run(batcher, [good, bad])
    assert bad.reason == "error" and "callback broke" in bad.error
    assert good.text == solo_greedy(tiny_serve_dir, adapters_dir, [("a0", ids, 12)])[0]
    assert (good.released, bad.released) == (1, 1)


def test_bad_prompt_ids_fail_alone_in_a_shared_prefill(tiny_serve_dir, adapters_dir, weights):
    model, tokenizer, ids = _setup(tiny_serve_dir, adapters_dir)
    good, bad, empty = _Collector(), _Collector(), _Collector()
    batcher = Batcher(model, tokenizer, max_batch_size=4, weights=weights)
    batcher.submit(_request(ids, "a0", good))
    batcher.submit(_request([1, 10**9], None, bad))
    batcher.submit(_request([], None, empty))
    _run(batcher, [good, bad, empty])
    assert bad.reason == "error" and str(batcher.vocab - 1) in bad.error and empty.reason == "error"
    assert good.text == solo_greedy(tiny_serve_dir, adapters_dir, [("a0", ids, 12)])[0]


def test_a_tiny_temperature_samples_the_argmax():
    logits = torch.tensor([30.0, 29.0, -5.0, 12.0])
    for temperature in (2.2250738585e-313, 1e-45, 6e-38, 1e-30, 1e-6):  # 2e-313: found by the fuzzer
        params = SamplingParams(temperature=temperature)
        assert {choose_token(logits, params, make_generator(s)) for s in range(10)} == {0}
    tiny_top_p = SamplingParams(temperature=1.0, top_p=5e-324)  # found by the fuzzer: 0 in float32
    assert {choose_token(logits, tiny_top_p, make_generator(s)) for s in range(10)} == {0}
