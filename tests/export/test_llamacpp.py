"""llama.cpp itself (llama-cpp-python) runs the exported GGUF files and reproduces lorakit's greedy outputs.

The base is the embedded default's own GGUF file; the adapter is trained here for a few steps on the main job's
data, so it changes most answers (the control: the base model alone agrees with the adapter on few rows). The
prompts are the main job's held-out rows. Skipped only where llama_cpp cannot be imported.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from export_helpers import chat_prompt_ids, patterned_copy, stop_ids, train_quickly

import lorakit
from lorakit import LoraConfig
from lorakit.export import export_gguf_adapter, export_gguf_merged, read_adapter_files, resolve_base
from lorakit.export.agreement import agreement, llama_cpp_greedy, lorakit_greedy

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama_cpp is not importable: build its wheel (scripts/build_llamacpp_wheel.sh), rerun scripts/setup.sh",
)
ROOT = Path(__file__).resolve().parents[2]
N_PROMPTS, MAX_NEW, TRAIN_STEPS = 20, 40, 8  # 95% of 20 rows: at most one may differ


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "examples" / "data" / name).read_text().splitlines() if line]


@pytest.fixture(scope="module")
def trained(default_model_dir, tmp_path_factory):
    """A few-step adapter on the default model, its greedy answers, and the base model's answers."""
    model, tokenizer = lorakit.load_model(default_model_dir)
    prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in rows("orders_eval.jsonl")[:N_PROMPTS]]
    stops = stop_ids(tokenizer)
    base_out = lorakit_greedy(model, prompts, MAX_NEW, stops)
    lorakit.add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    losses = train_quickly(model, tokenizer, rows("orders_train.jsonl"), TRAIN_STEPS)
    assert losses[-1] < losses[0] / 2, losses
    folder = tmp_path_factory.mktemp("adapters")
    lorakit.save_adapter(model, folder / "plain")
    patterned_copy(folder / "plain", folder / "patterned")
    return {"dir": default_model_dir, "folder": folder, "prompts": prompts, "stops": stops, "base": base_out}


def lorakit_answers(trained, variant: str) -> list[list[int]]:
    """lorakit's greedy answers with an adapter variant loaded from its folder (computed once per variant)."""
    if variant not in trained:
        model, _ = lorakit.load_model(trained["dir"])
        lorakit.load_adapter(model, trained["folder"] / variant)
        trained[variant] = lorakit_greedy(model, trained["prompts"], MAX_NEW, trained["stops"])
    return trained[variant]


@pytest.mark.parametrize("variant", ["plain", "patterned"])
def test_llama_cpp_with_the_exported_adapter_generates_what_lorakit_generates(trained, tmp_path, variant):
    files = read_adapter_files(trained["folder"] / variant)
    base = resolve_base(files)
    export_gguf_adapter(files, base, tmp_path / "adapter.gguf")
    expected = lorakit_answers(trained, variant)
    prompts, stops = trained["prompts"], trained["stops"]
    with_lora = llama_cpp_greedy(base.gguf_path, prompts, MAX_NEW, stops, tmp_path / "adapter.gguf")
    without = llama_cpp_greedy(base.gguf_path, prompts, MAX_NEW, stops)
    assert agreement(with_lora, expected).fraction >= 0.95
    assert agreement(without, expected).fraction <= 0.5  # control: without the adapter most answers differ


def test_llama_cpp_runs_the_merged_gguf_like_lorakit(trained, tmp_path):
    files = read_adapter_files(trained["folder"] / "patterned")
    base = resolve_base(files)
    export_gguf_merged(files, base, tmp_path / "merged.gguf", quant="f16")
    expected = lorakit_answers(trained, "patterned")
    merged = llama_cpp_greedy(tmp_path / "merged.gguf", trained["prompts"], MAX_NEW, trained["stops"])
    assert agreement(merged, expected).fraction >= 0.95
    assert agreement(merged, trained["base"]).fraction <= 0.5
