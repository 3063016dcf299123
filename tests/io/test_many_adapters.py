"""One base, a folder of adapters: load many (different ranks and targets), list, switch, stack, disable, delete."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import lorakit
from lorakit import FormatError, LoraConfig

KINDS = {
    "tone": LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "format": LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
    "vocab": LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False),
}


@pytest.fixture
def zoo(tiny_llama, tmp_path):
    """Three adapters saved as sibling folders, with each one's solo logits on a probe."""
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    solo = {}
    for name, cfg in KINDS.items():
        model = copy.deepcopy(tiny_llama)
        lorakit.add_adapter(model, cfg)
        with torch.no_grad():
            solo[name] = model(ids).logits
        lorakit.save_adapter(model, tmp_path / "zoo" / name)
    with torch.no_grad():
        solo[None] = tiny_llama(ids).logits
    return tmp_path / "zoo", ids, solo


@torch.no_grad()
def test_a_folder_of_adapters_loads_and_each_switches_in_exactly(tiny_llama, zoo):
    folder, ids, solo = zoo
    assert lorakit.load_adapters(tiny_llama, folder) == ["format", "tone", "vocab"]
    assert lorakit.list_adapters(tiny_llama) == ["format", "tone", "vocab"]
    assert lorakit.active_adapters(tiny_llama) == ["format"]
    for name in KINDS:
        lorakit.set_adapter(tiny_llama, name)
        assert torch.equal(tiny_llama(ids).logits, solo[name]), name
    with lorakit.disabled(tiny_llama):
        assert torch.equal(tiny_llama(ids).logits, solo[None])


@torch.no_grad()
def test_several_active_adapters_add_their_updates(tiny_llama, zoo):
    folder, ids, solo = zoo
    lorakit.load_adapters(tiny_llama, folder)
    lorakit.set_adapter(tiny_llama, ["tone", "format"])
    # the model is not linear in its weights, so compare layer outputs: each adapted layer adds both deltas
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + layer.lora_forward(x, "tone") + layer.lora_forward(x, "format")
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    assert (tiny_llama(ids).logits - solo["tone"]).abs().max() > 1e-3


def test_deleting_an_adapter_frees_its_tensors(tiny_llama, zoo):
    folder, ids, solo = zoo
    lorakit.load_adapters(tiny_llama, folder)
    refs = [weakref.ref(t) for t in lorakit.adapter_state_dict(tiny_llama, "format").values()]
    lorakit.delete_adapter(tiny_llama, "format")
    gc.collect()
    assert all(r() is None for r in refs)
    assert lorakit.list_adapters(tiny_llama) == ["tone", "vocab"]
    lorakit.set_adapter(tiny_llama, "vocab")
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, solo["vocab"], atol=1e-5, rtol=0)


def test_a_folder_without_adapters_is_refused(tiny_llama, tmp_path):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(FormatError, match="holds no adapter"):
        lorakit.load_adapters(tiny_llama, tmp_path / "empty")
