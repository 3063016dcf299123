"""Serving fixtures: a tiny random Llama with the default model's tokenizer, eight saved adapters; the server helpers
live in serve_helpers.py next to this file."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))

ADAPTER_CONFIGS = {
    "a0": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "a1": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "a2": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False),
    "a3": LoraConfig(r=4, lora_alpha=16, target_modules=["gate_proj", "up_proj"], init_lora_weights=False),
    "a4": LoraConfig(r=6, lora_alpha=6, target_modules=["q_proj", "k_proj"], init_lora_weights=False),
    "a5": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "a6": LoraConfig(r=1, lora_alpha=2, target_modules=["v_proj"], init_lora_weights=False),
    "a7": LoraConfig(r=3, lora_alpha=9, target_modules=["o_proj", "up_proj"], init_lora_weights=False),
}


@pytest.fixture(scope="session")
def tiny_serve_dir(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) with the default model's tokenizer, as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits: clear argmax margins, so greedy outputs are well defined
        model.lm_head.weight.mul_(20)
    folder = tmp_path_factory.mktemp("tiny_serve")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapters_dir(tiny_serve_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight random adapters of the tiny model (different ranks and targets), one sub-folder each."""
    model, _ = lorakit.load_model(tiny_serve_dir)
    folder = tmp_path_factory.mktemp("adapters")
    gen = torch.Generator().manual_seed(0)
    for name, config in ADAPTER_CONFIGS.items():
        lorakit.add_adapter(model, config, name=name)
        with torch.no_grad():
            for t in lorakit.adapter_state_dict(model, name).values():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
        lorakit.save_adapter(model, folder / name, name=name)
    return folder


@pytest.fixture
def fresh_adapters(adapters_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the adapters folder (tests that add, break or delete folders)."""
    return Path(shutil.copytree(adapters_dir, tmp_path / "adapters"))


@pytest.fixture(params=[None, "fp32"], ids=["reference", "engine"])
def weights(request: pytest.FixtureRequest) -> str | None:
    """The scheduler's model step: None is transformers' forward (the reference path), "fp32" the fast engine."""
    return request.param
