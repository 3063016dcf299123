"""Every endpoint of a real `lorakit serve` on loopback: completions, chat, streaming, models, metrics, health,
the official openai client, and OpenAI-style errors for bad input."""

from __future__ import annotations

import json

import httpx
import pytest
from serve_helpers import running_server, solo_greedy

from lorakit.serve.protocol import encode_chat, encode_prompt

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, max_tokens=64) as (url, state):
        yield url, state


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def _sse(url: str, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]


def test_health_and_models_list_base_and_every_adapter(server):
    url, _ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny", *[f"a{i}" for i in range(8)]]


@pytest.mark.parametrize("model", ["tiny", "a1", "a4"])
def test_greedy_completion_equals_generate_alone(server, tiny_serve_dir, adapters_dir, model):
    url, state = server
    body = _post(url, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    ids = encode_prompt(state.tokenizer, PROMPT)
    expected = solo_greedy(tiny_serve_dir, adapters_dir, [(None if model == "tiny" else model, ids, 8)])
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["choices"][0]["text"] == expected[0]
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 8, "total_tokens": len(ids) + 8}


def test_adapters_change_the_output(server):
    url, _ = server
    texts = {
        m: _post(url, "/v1/completions", {"model": m, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json()
        for m in ("tiny", "a1", "a5")
    }
    assert len({t["choices"][0]["text"] for t in texts.values()}) == 3


def test_chat_completion_applies_the_chat_template(server):
    url, state = server
    messages = [{"role": "user", "content": "Say hi"}]
    body = _post(url, "/v1/chat/completions", {"model": "a2", "messages": messages, "max_tokens": 5, "temperature": 0})
    answer = body.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["prompt_tokens"] == len(encode_chat(state.tokenizer, messages))
    assert "<|im_start|>" in state.tokenizer.decode(encode_chat(state.tokenizer, messages))


def test_streamed_text_equals_the_non_streamed_text_and_ends_with_done(server):
    url, _ = server
    body = {"model": "a3", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    whole = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    events = _sse(url, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)

    chat = {"model": "a3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    whole = _post(url, "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    events = _sse(url, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == whole
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and events[-1] == "[DONE]"


def test_stop_strings_cut_the_output_before_the_stop(server):
    url, _ = server
    body = {"model": "a0", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    full = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = _post(url, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(stop)]
    streamed = [json.loads(e) for e in _sse(url, "/v1/completions", {**body, "stop": stop})[:-1]]
    assert "".join(c["choices"][0]["text"] for c in streamed) == cut["text"]


def test_sampling_is_reproducible_with_a_seed(server):
    url, _ = server
    body = {"model": "a1", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "top_p": 0.9}
    first = _post(url, "/v1/completions", {**body, "seed": 7}).json()["choices"][0]["text"]
    assert _post(url, "/v1/completions", {**body, "seed": 7}).json()["choices"][0]["text"] == first
    others = {_post(url, "/v1/completions", {**body, "seed": s}).json()["choices"][0]["text"] for s in range(4)}
    assert len(others | {first}) > 1


def _metrics(url: str) -> dict[str, float]:
    """``/metrics`` as {sample name with labels: value}; every non-comment line must parse."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_report_requests_tokens_batches_adapters_and_queue(server):
    url, _ = server
    before = _metrics(url)
    body = _post(url, "/v1/completions", {"model": "a6", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}).json()
    after = _metrics(url)
    usage, reason = body["usage"], body["choices"][0]["finish_reason"]
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    assert delta[f'lorakit_requests_total{{finish_reason="{reason}"}}'] == 1
    assert sum(v for k, v in delta.items() if k.startswith("lorakit_requests_total")) == 1
    assert delta["lorakit_prompt_tokens_total"] == usage["prompt_tokens"]
    assert delta["lorakit_generated_tokens_total"] == usage["completion_tokens"]
    # the prefill picks the first token; every further token is one decode step of this request alone
    assert delta["lorakit_batch_size_count"] == usage["completion_tokens"] - 1
    assert delta["lorakit_batch_size_sum"] == delta["lorakit_batch_size_count"]
    assert delta['lorakit_batch_size_bucket{le="1"}'] == delta["lorakit_batch_size_count"]
    assert after["lorakit_tokens_per_second"] > 0
    assert after["lorakit_queue_depth"] == 0 and after["lorakit_running_requests"] == 0
    resident = [k for k in after if k.startswith("lorakit_adapter_resident{")]
    assert after['lorakit_adapter_resident{adapter="a6"}'] == 1
    assert after["lorakit_resident_adapters"] == len(resident)


def test_the_official_openai_client_works_unchanged(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="a5", prompt=PROMPT, max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    chat = client.chat.completions.create(
        model="a5", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="a5", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    stream = client.completions.create(model="a5", prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == done.choices[0].text
    assert [m.id for m in client.models.list()][:2] == ["tiny", "a0"]
    with pytest.raises(openai.NotFoundError, match="a0"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err["message"]


def test_bad_input_gets_openai_style_errors(server):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(r, 400)
    assert "'model' is a required field" in _error(_post(url, "/v1/completions", {"prompt": "x"}), 400)
    assert "'prompt' is a required field" in _error(_post(url, "/v1/completions", {"model": "tiny"}), 400)
    assert "'messages'" in _error(_post(url, "/v1/chat/completions", {"model": "tiny"}), 400)
    msg = _error(_post(url, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 65}), 400)
    assert "max_tokens=65" in msg and "limit of 64" in msg
    long_prompt = "word " * 300
    n_long = len(encode_prompt(server[1].tokenizer, long_prompt))
    assert n_long >= 256
    msg = _error(_post(url, "/v1/completions", {"model": "tiny", "prompt": long_prompt}), 400)
    assert f"maximum context length is 256 tokens, but the prompt has {n_long} tokens" in msg
    n = len(encode_prompt(server[1].tokenizer, "word " * 200))
    assert n < 256 < n + 60
    msg = _error(_post(url, "/v1/completions", {"model": "tiny", "prompt": "word " * 200, "max_tokens": 60}), 400)
    assert f"you requested {n + 60} tokens ({n} in the prompt, 60 in the completion)" in msg
    msg = _error(_post(url, "/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    assert "'nope' does not exist" in msg and "'tiny', 'a0'" in msg
    assert "temperature" in _error(
        _post(url, "/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 3}), 400
    )


def test_ignore_eos_goes_on_to_max_tokens_where_eos_would_stop(tiny_serve_dir):
    import torch

    import lorakit
    from lorakit.serve.server import build_state, serve_in_thread

    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    with torch.no_grad():  # make the prompt's greedy next token an end-of-sequence token of this model
        first = model(torch.tensor([encode_prompt(tokenizer, PROMPT)])).logits[0, -1].argmax().item()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    with serve_in_thread(build_state(model, tokenizer, base_name="tiny")) as url:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 7, "temperature": 0}
        plain = _post(url, "/v1/completions", body).json()
        assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] == 1
        longer = _post(url, "/v1/completions", {**body, "ignore_eos": True}).json()
        assert longer["choices"][0]["finish_reason"] == "length" and longer["usage"]["completion_tokens"] == 7
        assert "true or false" in _error(_post(url, "/v1/completions", {**body, "ignore_eos": "yes"}), 400)
