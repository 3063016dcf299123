"""Shared fixtures: the embedded default model (converted once per session) and a tiny random Llama."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# No test may reach the real Hub: huggingface_hub reads HF_ENDPOINT once, at import, so point it at a closed
# loopback port before anything imports it (a stray download then fails at once). Tests of Hub loading start
# their own loopback Hub (tests/hub_server.py) and set HF_ENDPOINT themselves; lorakit reads it at call time.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
from tiny_models import tiny_llama as make_tiny_llama


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """One torch thread for the whole suite: with 2 threads on a shared 2-core box, OpenMP workers spin-wait and
    a tiny model's forward takes 0.7 s instead of 2 ms (and a 135M forward 5 s instead of 0.2 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The safetensors cache folder of the embedded default model (SmolLM2-135M-Instruct).

    Uses ``$LORAKIT_HOME`` when set (CI may keep a warm cache there), else a session temp folder, and sets
    ``LORAKIT_HOME`` to it for the session so every `load_model` in the tests finds the same cache. The
    first use converts the GGUF file (~20 s); the folder is an ordinary Hugging Face model folder.
    """
    from lorakit.models import default_model_name, ensure_cached

    home = os.environ.get("LORAKIT_HOME") or str(tmp_path_factory.mktemp("lorakit_home"))
    folder = ensure_cached(default_model_name(), cache_dir=home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_HOME", home)
        yield folder


@pytest.fixture
def default_model(default_model_dir: Path):
    """A fresh ``(model, tokenizer)`` of the embedded default model, loaded from the session cache (fp32, eval)."""
    from lorakit.models import load_model

    return load_model(default_model_dir)


@pytest.fixture
def tiny_llama():
    """A tiny random LlamaForCausalLM (seeded, eval mode) for fast CPU tests."""
    return make_tiny_llama()
