"""The scheduler without HTTP: grouped left-padded prefill and requests joining mid-decode give the solo greedy
tokens; cancellation; stop strings that span tokens; seeded sampling."""

from __future__ import annotations

import threading

import torch
from serve_helpers import solo_greedy

import lorakit
from lorakit.serve.batcher import Batcher, GenRequest
from lorakit.serve.sampling import SamplingParams, TextStream, choose_token, make_generator


class _Collector:
    def __init__(self) -> None:
        self.text, self.reason, self.done = "", None, threading.Event()
        self.released = 0

    def __call__(self, event) -> None:
        self.text += event.text
        if event.finish_reason:
            self.reason = event.finish_reason
            self.done.set()


def _model(tiny_serve_dir, adapters_dir, names):
    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    for name in names:
        lorakit.load_adapter(model, adapters_dir / name, name=name)
    return model, tokenizer


def test_grouped_prefill_and_late_joiners_equal_solo_greedy(tiny_serve_dir, adapters_dir, weights):
    names = ["a0", "a1", "a3", "a7"]
    model, tokenizer = _model(tiny_serve_dir, adapters_dir, names)
    prompts = [tokenizer(p).input_ids for p in ["Hi", "A much longer prompt than the others, with", "x y z"]]
    jobs = [(names[i % 4], prompts[i % 3], 6 + i) for i in range(8)]
    batcher = Batcher(model, tokenizer, max_batch_size=8, weights=weights)
    collectors = [_Collector() for _ in jobs]
    reqs = [
        GenRequest(ids, a, SamplingParams(max_tokens=n, temperature=0), c) for (a, ids, n), c in zip(jobs, collectors)
    ]
    for req in reqs[:4]:  # one group of 4 (three prompt lengths), before the scheduler starts
        batcher.submit(req)
    first = collectors[0].__call__

    def join_late(event):  # after the first group's first decode steps, the rest joins one by one
        first(event)
        if len(collectors[0].text) and reqs[4].id not in joined:
            joined.add(reqs[4].id)
            for req in reqs[4:]:
                batcher.submit(req)

    joined: set[int] = set()
    reqs[0].on_event = join_late
    batcher.start()
    try:
        assert all(c.done.wait(30) for c in collectors)
    finally:
        batcher.close()
    assert [c.text for c in collectors] == solo_greedy(tiny_serve_dir, adapters_dir, jobs)
    assert all(c.reason == "length" for c in collectors)


def test_cancelled_requests_end_and_release_their_adapter(tiny_serve_dir, adapters_dir, weights):
    model, tokenizer = _model(tiny_serve_dir, adapters_dir, ["a2"])
    batcher = Batcher(model, tokenizer, max_batch_size=1, weights=weights)
    released = []
    long, queued = _Collector(), _Collector()
    running = GenRequest([5, 6, 7], "a2", SamplingParams(max_tokens=200), long, lambda: released.append("r"))
    waiting = GenRequest([5, 6], "a2", SamplingParams(max_tokens=5), queued, lambda: released.append("w"))
    batcher.submit(running)
    batcher.submit(waiting)
    batcher.cancel(waiting)
    batcher.start()
    try:
        assert queued.done.wait(10) and queued.reason == "cancelled"
        batcher.cancel(running)
        assert long.done.wait(10) and long.reason == "cancelled"
    finally:
        batcher.close()
    assert sorted(released) == ["r", "w"] and batcher.running == 0


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_spanning_tokens_are_held_back_then_cut():
    stream = TextStream(_CharTokenizer(), ["END"])
    out = [stream.push(ord(c)) for c in "abEN"]
    assert "".join(d for d, _ in out) == "ab" and not any(hit for _, hit in out)  # "EN" may start "END"
    assert stream.push(ord("D")) == ("", True) and stream.text == "abEN"[:2]
    stream = TextStream(_CharTokenizer(), ["END"])
    assert "".join(stream.push(ord(c))[0] for c in "xEN") + stream.flush() == "xEN"  # no stop: all comes out


def test_seeded_sampling_is_reproducible_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0])
    params = SamplingParams(temperature=1.0, seed=3)
    draws = [choose_token(logits, params, make_generator(3)) for _ in range(3)]
    assert len(set(draws)) == 1
    narrow = SamplingParams(temperature=1.0, top_p=0.01)
    assert {choose_token(logits, narrow, make_generator(s)) for s in range(20)} == {0}
    assert choose_token(logits, SamplingParams(temperature=0), make_generator(0)) == 0
