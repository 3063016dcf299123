"""Which model step `lorakit serve` runs: the fast engine by default (fp32: greedy outputs equal the reference path,
tested across tests/serve with the ``weights`` fixture), the reference path on request or where the engine cannot
run the model."""

from __future__ import annotations

import pytest

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.serve.server import build_state


def test_serve_runs_the_engine_by_default_and_the_reference_on_request(tiny_serve_dir):
    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    batcher = build_state(model, tokenizer, base_name="tiny").batcher
    assert batcher.step is batcher.engine and batcher.engine.engine.fmt == "fp32"
    batcher = build_state(model, tokenizer, base_name="tiny", weights="int8").batcher
    assert batcher.engine.engine.fmt == "int8"
    batcher = build_state(model, tokenizer, base_name="tiny", weights=None).batcher
    assert batcher.engine is None and batcher.step is batcher.reference
    with pytest.raises(ConfigError, match="'int3' is not one of"):
        build_state(model, tokenizer, base_name="tiny", weights="int3")


def test_a_packed_format_on_a_model_the_engine_cannot_run_is_refused(tiny_serve_dir):
    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    model.config.hidden_act = "gelu"  # not a Llama the engine computes
    assert build_state(model, tokenizer, base_name="tiny").batcher.engine is None  # fp32: the reference path
    with pytest.raises(ConfigError, match="--weights int8 needs the fast decode engine.*hidden_act"):
        build_state(model, tokenizer, base_name="tiny", weights="int8")


def test_reference_with_a_packed_format_is_one_error_line(capsys):
    assert main(["serve", "--reference", "--weights", "int8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: --weights int8") and err.count("\n") == 1


def test_a_negative_prefix_cache_size_is_one_error_line(capsys):
    assert main(["serve", "--prefix-cache-mb", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: --prefix-cache-mb must be >= 0") and err.count("\n") == 1


def test_the_prefix_cache_size_reaches_the_engine(tiny_serve_dir):
    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    assert build_state(model, tokenizer, base_name="tiny").batcher.engine.engine.prefix.budget == 256 * 2**20
    off = build_state(model, tokenizer, base_name="tiny", prefix_cache_mb=0).batcher.engine.engine.prefix
    assert off.budget == 0


def test_cuda_graphs_option_reaches_the_engine(tiny_serve_dir, monkeypatch):
    model, tokenizer = lorakit.load_model(tiny_serve_dir)
    assert build_state(model, tokenizer, base_name="tiny").batcher.engine.engine.graphs is None  # a CPU model
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA model"):
        build_state(model, tokenizer, base_name="tiny", cuda_graphs=True)
    seen = []

    def fake_build_state(*args, **kwargs):
        seen.append(kwargs["cuda_graphs"])
        raise ConfigError("stop here")

    monkeypatch.setattr("lorakit.serve.server.build_state", fake_build_state)
    assert main(["serve", "--model", str(tiny_serve_dir), "--no-cuda-graphs"]) == 1
    assert main(["serve", "--model", str(tiny_serve_dir)]) == 1
    assert seen == [False, None]
