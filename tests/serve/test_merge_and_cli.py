"""``--merge NAME`` (one adapter folded into the base, no LoRA layers left) and the ``lorakit serve`` command."""

from __future__ import annotations

import httpx
from serve_helpers import running_server, solo_greedy

from lorakit.cli import build_parser, main
from lorakit.layers import LoraLayer
from lorakit.serve.protocol import encode_prompt


def test_merged_mode_serves_one_adapter_with_no_lora_layers(tiny_serve_dir, adapters_dir):
    with running_server(tiny_serve_dir, adapters_dir, merge="a1") as (url, state):
        assert not any(isinstance(m, LoraLayer) for m in state.model.modules())
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["a1"]
        body = {"model": "a1", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
        text = httpx.post(url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
        ids = encode_prompt(state.tokenizer, "Hello there")
        r = httpx.post(url + "/v1/completions", json={**body, "model": "a2"}, timeout=30)
        assert r.status_code == 404 and "['a1']" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/adapters", json={"name": "a2"}, timeout=30)
        assert r.status_code == 400 and "merged mode" in r.json()["error"]["message"]
    assert text == solo_greedy(tiny_serve_dir, adapters_dir, [("a1", ids, 6)])[0]


def test_serve_command_is_registered_with_its_flags():
    args = build_parser().parse_args(["serve", "--model", "m", "--adapters", "d", "--max-adapters", "3",
                                      "--max-batch-size", "4", "--merge", "x"])  # fmt: skip
    assert (args.host, args.port, args.max_adapters, args.max_batch_size, args.merge) == ("127.0.0.1", 8000, 3, 4, "x")


def test_serve_command_rejects_a_missing_adapters_folder(tmp_path, capsys):
    assert main(["serve", "--adapters", str(tmp_path / "none")]) == 1
    assert "is not a folder" in capsys.readouterr().err
