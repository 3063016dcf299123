"""`lorakit.generate` (text in, text out) and its wiring: the embedded SmolLM2 with an adapter gives the greedy text
of transformers' ``generate``; unsupported models fall back; `lorakit serve` and `lorakit eval` take the engine."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterNotFoundError, ConfigError
from lorakit.inference.reference import reference_generate


def test_default_model_greedy_text_equals_transformers_generate(default_model):
    model, tokenizer = default_model
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    lorakit.add_adapter(model, config, name="style")
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(model, "style").values():
            t.mul_(4)  # a visible change of behaviour
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name one planet and say why it is interesting."}]]  # fmt: skip
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    got = lorakit.generate(model, tokenizer, prompts, ["style", None], max_new_tokens=12)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    want = reference_generate(model, ids, ["style", None], 12, stops)
    assert got == [tokenizer.decode(w, skip_special_tokens=True) for w in want]
    assert got[0] != got[1] or want[0] != want[1]


def test_unsupported_model_falls_back_and_refuses_packed_weights(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = tiny_gpt2()
    ids = [[1, 2, 3]]
    got = lorakit.generate(model, tokenizer, ids, max_new_tokens=5, stop_token_ids=[])
    x = torch.tensor(ids)
    want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert got == [tokenizer.decode(want[0, 3:], skip_special_tokens=True)]
    with pytest.raises(ConfigError, match="weights='int8' needs the fast decode path"):
        lorakit.generate(model, tokenizer, ids, weights="int8")


def test_adapter_names_are_checked(lora_llama, default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    with pytest.raises(AdapterNotFoundError, match=r"\['nope'\] are not loaded"):
        lorakit.generate(lora_llama, tokenizer, [[1, 2]], ["nope"])
    with pytest.raises(ConfigError, match="2 names for 1 prompts"):
        lorakit.generate(lora_llama, tokenizer, [[1, 2]], ["qv", "all"])
    lorakit.set_adapter(lora_llama, ["qv", "all"])
    with pytest.raises(ConfigError, match="2 adapters are active"):
        lorakit.generate(lora_llama, tokenizer, [[1, 2]])
