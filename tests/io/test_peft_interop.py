"""Both directions of the PEFT on-disk format, checked against the real `peft` package (logits to 1e-4, fp32)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

import lorakit
from lorakit import LoraConfig

ATOL = 1e-4


def _randomize(model: nn.Module, name: str = "default", seed: int = 1) -> None:
    """Give every LoRA factor non-zero values, so the adapter actually changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(model, name).values():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)


def _randomize_peft(model: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _ids(vocab: int = 128, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(3))


CONFIGS = {
    "attention": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all_linear_rslora": dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "embedding_and_mlp": dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "gate_proj", "down_proj"]),
    "patterns": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}
    ),
    "regex_and_layers": dict(r=3, lora_alpha=6, target_modules=r".*\.1\.self_attn\.(q|v)_proj"),
    "layers_to_transform": dict(r=3, lora_alpha=6, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_lorakit_adapter_loads_in_peft_with_same_logits(tiny_llama, tmp_path, kind):
    base = copy.deepcopy(tiny_llama)
    lorakit.add_adapter(tiny_llama, LoraConfig(**CONFIGS[kind]))
    _randomize(tiny_llama)
    ids = _ids()
    ours = tiny_llama(ids).logits
    lorakit.save_adapter(tiny_llama, tmp_path)

    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    theirs = peft_model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # The adapter really changes the outputs (the check above is not comparing two base models).
    with peft_model.disable_adapter():
        assert (peft_model(ids).logits - ours).abs().max() > 1e-3


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_peft_adapter_loads_in_lorakit_with_same_logits(tiny_llama, tmp_path, kind):
    base = copy.deepcopy(tiny_llama)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), PeftLoraConfig(**CONFIGS[kind])).eval()
    _randomize_peft(peft_model)
    ids = _ids()
    theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)

    assert lorakit.load_adapter(base, tmp_path) == "default"
    torch.testing.assert_close(base(ids).logits, theirs, atol=ATOL, rtol=0)


def test_saved_files_use_peft_key_names(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    lorakit.save_adapter(tiny_llama, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_B" in keys
    assert len(keys) == 6
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["inference_mode"] is True
    assert sorted(config["target_modules"]) == ["embed_tokens", "q_proj"]


def test_gpt2_conv1d_round_trips_through_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).eval()
    base = copy.deepcopy(model)
    lorakit.add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]))
    _randomize(model)
    ids = _ids()
    ours = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    lorakit.load_adapter(base, tmp_path)
    torch.testing.assert_close(base(ids).logits, ours, atol=ATOL, rtol=0)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 3), padding=1, stride=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)  # (b, 8, L)
        h = self.conv2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # (b, 8, L, 4)
        return self.head(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_conv_and_bias_modes_round_trip_through_peft(tmp_path, bias):
    torch.manual_seed(0)
    model, x = _ConvNet().eval(), torch.randn(2, 4, 10)
    base = copy.deepcopy(model)
    cfg = dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2"], bias=bias, modules_to_save=["head"])
    lorakit.add_adapter(model, LoraConfig(**cfg))
    _randomize(model)
    with torch.no_grad():  # trained biases are part of the adapter in "all" / "lora_only"
        for p in lorakit.adapter_state_dict(model, "default", bias).values():
            p.add_(0.05)
    ours = model(x)
    lorakit.save_adapter(model, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(x)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)

    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(**cfg)).eval()
    _randomize_peft(peft_model)
    theirs = peft_model(x)
    peft_model.save_pretrained(tmp_path / "from_peft")
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path / "from_peft")
    torch.testing.assert_close(fresh(x), theirs, atol=ATOL, rtol=0)


def test_several_adapters_save_in_peft_subfolders(tiny_llama, tmp_path):
    base = copy.deepcopy(tiny_llama)
    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]), name="default")
    lorakit.add_adapter(tiny_llama, LoraConfig(r=4, target_modules=["v_proj"]), name="tone")
    _randomize(tiny_llama, "default", seed=5)
    _randomize(tiny_llama, "tone", seed=6)
    lorakit.save_adapter(tiny_llama, tmp_path, name=None)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "tone" / "adapter_config.json").is_file()

    ids = _ids()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft_model.load_adapter(tmp_path / "tone", adapter_name="tone")
    for name in ("default", "tone"):
        lorakit.set_adapter(tiny_llama, name)
        peft_model.set_adapter(name)
        torch.testing.assert_close(peft_model(ids).logits, tiny_llama(ids).logits, atol=ATOL, rtol=0)


def test_default_model_adapter_interop_with_peft(default_model, default_model_dir, tmp_path):
    """The embedded SmolLM2-135M-Instruct, both directions, q/k/v/o r=16 (the seed config)."""
    from lorakit.models import load_model

    model, tokenizer = default_model
    ids = tokenizer(["Turn this into JSON: Alice, 31, Paris."], return_tensors="pt").input_ids
    seed_config = dict(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.05, bias="none"
    )
    lorakit.add_adapter(model, LoraConfig(**seed_config, task_type="CAUSAL_LM"))
    model.eval()
    _randomize(model)
    with torch.no_grad():
        ours = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(load_model(default_model_dir)[0], tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, atol=ATOL, rtol=0)

    peft_model = get_peft_model(load_model(default_model_dir)[0], PeftLoraConfig(**seed_config)).eval()
    _randomize_peft(peft_model, seed=9)
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "theirs")
    fresh = load_model(default_model_dir)[0]
    lorakit.load_adapter(fresh, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, theirs, atol=ATOL, rtol=0)
