"""Adapter files: atomic writes, strict reads, and bad files that leave the model unchanged."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lorakit
from lorakit import AdapterExistsError, FormatError, IncompatibleAdapterError, LoraConfig
from lorakit.io.atomic import atomic_write_bytes, read_adapter_dir


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def _assert_unchanged(model, snapshot):
    state, types = snapshot
    assert [type(m).__name__ for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert lorakit.list_adapters(model) == []


@pytest.fixture
def saved_adapter(tiny_llama, tmp_path):
    import copy

    model = copy.deepcopy(tiny_llama)
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_save_then_load_round_trips_exactly(tiny_llama, saved_adapter):
    from safetensors.torch import load_file

    from lorakit.io.peft_format import to_peft_state

    lorakit.load_adapter(tiny_llama, saved_adapter)
    reloaded = to_peft_state(lorakit.adapter_state_dict(tiny_llama, "default"), "default")
    on_disk = load_file(saved_adapter / "adapter_model.safetensors")
    assert len(on_disk) == 8
    assert set(on_disk) == set(reloaded)
    for key, tensor in on_disk.items():
        assert torch.equal(reloaded[key], tensor), key


def test_loaded_adapter_is_frozen_unless_trainable(tiny_llama, saved_adapter):
    lorakit.load_adapter(tiny_llama, saved_adapter)
    assert lorakit.trainable_parameters(tiny_llama)[0] == 0
    lorakit.load_adapter(tiny_llama, saved_adapter, name="train_me", trainable=True)
    params = lorakit.adapter_state_dict(tiny_llama, "train_me")
    assert lorakit.trainable_parameters(tiny_llama)[0] == sum(p.numel() for p in params.values())
    assert lorakit.active_adapters(tiny_llama) == ["default"]  # later loads do not switch the active adapter


def test_missing_weights_file_raises_format_error_and_leaves_model_unchanged(tiny_llama, saved_adapter):
    snap = _snapshot(tiny_llama)
    os.remove(saved_adapter / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="adapter_model.safetensors"):
        lorakit.load_adapter(tiny_llama, saved_adapter)
    _assert_unchanged(tiny_llama, snap)


def test_missing_config_raises_format_error(tiny_llama, saved_adapter):
    os.remove(saved_adapter / "adapter_config.json")
    with pytest.raises(FormatError, match="adapter_config.json"):
        lorakit.load_adapter(tiny_llama, saved_adapter)


def test_missing_directory_raises_format_error(tiny_llama, tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        lorakit.load_adapter(tiny_llama, tmp_path / "nope")


def test_truncated_safetensors_raises_format_error_and_leaves_model_unchanged(tiny_llama, saved_adapter):
    snap = _snapshot(tiny_llama)
    weights = saved_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FormatError, match="not a valid safetensors"):
        lorakit.load_adapter(tiny_llama, saved_adapter)
    _assert_unchanged(tiny_llama, snap)


def test_corrupt_json_raises_format_error(tiny_llama, saved_adapter):
    (saved_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        lorakit.load_adapter(tiny_llama, saved_adapter)


def test_unsupported_peft_feature_is_refused(tiny_llama, saved_adapter):
    cfg_file = saved_adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["lora_bias"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="lora_bias"):
        lorakit.load_adapter(tiny_llama, saved_adapter)


def test_shape_mismatch_names_layer_and_both_shapes_and_leaves_model_unchanged(tiny_llama, saved_adapter):
    from safetensors.torch import load_file, save_file

    snap = _snapshot(tiny_llama)
    weights = saved_adapter / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(4, 31)
    save_file(state, weights)
    with pytest.raises(IncompatibleAdapterError) as err:
        lorakit.load_adapter(tiny_llama, saved_adapter)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj.lora_A" in msg and "(4, 31)" in msg and "(4, 32)" in msg
    _assert_unchanged(tiny_llama, snap)


def test_adapter_for_other_architecture_is_incompatible(tiny_llama, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64))
    lorakit.add_adapter(gpt2, LoraConfig(r=2, target_modules=["c_attn"]))
    lorakit.save_adapter(gpt2, tmp_path)
    snap = _snapshot(tiny_llama)
    with pytest.raises(IncompatibleAdapterError, match="c_attn"):
        lorakit.load_adapter(tiny_llama, tmp_path)
    _assert_unchanged(tiny_llama, snap)


def test_loading_a_name_that_exists_is_refused(tiny_llama, saved_adapter):
    lorakit.load_adapter(tiny_llama, saved_adapter, name="a")
    with pytest.raises(AdapterExistsError, match="'a'"):
        lorakit.load_adapter(tiny_llama, saved_adapter, name="a")


def test_legacy_bin_adapter_loads(tiny_llama, saved_adapter):
    from safetensors.torch import load_file

    state = load_file(saved_adapter / "adapter_model.safetensors")
    torch.save(state, saved_adapter / "adapter_model.bin")
    os.remove(saved_adapter / "adapter_model.safetensors")
    lorakit.load_adapter(tiny_llama, saved_adapter)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert torch.equal(
        layer.lora_A["default"].weight, state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    )


def test_crash_mid_write_keeps_the_previous_adapter(tiny_llama, tmp_path, monkeypatch):
    """A crash while writing never leaves a half adapter where a good one was."""
    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.save_adapter(tiny_llama, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("lorakit.io.atomic.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(tiny_llama, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left, old bytes intact
    read_adapter_dir(tmp_path)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_save_keeps_other_files_in_the_folder(tiny_llama, tmp_path):
    (tmp_path / "README.md").write_text("my notes")
    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(tiny_llama, tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"


def test_saved_adapter_files_are_readable_by_others_like_plain_files(tiny_llama, tmp_path):
    """mkstemp creates 0600 files: without a chmod, a saved adapter is unreadable to a serving user."""
    lorakit.add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(tiny_llama, tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask
