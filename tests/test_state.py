"""Adapter tensors selected structurally (never by name substrings) and loaded strictly (all problems, one error)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import IncompatibleAdapterError, LoraConfig
from lorakit.state import adapter_state_dict, load_adapter_state_dict


class Net(nn.Module):
    """A model with user modules whose names contain "lora" (they must never be taken for adapter tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.flora_head = nn.Linear(8, 8)
        self.lora_A_like = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.out(self.lora_A_like(self.flora_head(self.proj(h))))


def make(r: int = 2, seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    model = Net().eval()
    torch.manual_seed(seed + 100)
    defaults = dict(target_modules=["embed", "proj"], init_lora_weights=False)
    return lorakit.add_adapter(model, LoraConfig(r=r, **{**defaults, **kwargs}))


IDS = torch.tensor([[1, 5, 7, 2]])
LORA_KEYS = {
    "embed.lora_embedding_A.default",
    "embed.lora_embedding_B.default",
    "proj.lora_A.default.weight",
    "proj.lora_B.default.weight",
}


def test_adapter_state_dict_keys_are_exactly_the_lora_tensors_not_lora_named_user_modules():
    model = make()
    state = adapter_state_dict(model, "default")
    assert set(state) == LORA_KEYS
    full = model.state_dict()
    assert all(torch.equal(full[k], t) for k, t in state.items())  # keys are the model's own state_dict keys


def test_adapter_state_dict_holds_live_tensors_not_copies():
    model = make()
    state = adapter_state_dict(model, "default")
    assert state["proj.lora_A.default.weight"] is model.proj.lora_A["default"].weight


def test_adapter_state_dict_of_one_adapter_excludes_the_others():
    model = make()
    lorakit.add_adapter(model, LoraConfig(r=3, target_modules=["proj"]), "other")
    assert set(adapter_state_dict(model, "other")) == {"proj.lora_A.other.weight", "proj.lora_B.other.weight"}
    assert set(adapter_state_dict(model, "default")) == LORA_KEYS


def test_adapter_state_dict_adds_modules_to_save_and_biases_by_bias_mode():
    model = make(modules_to_save=["out"], bias="lora_only")
    state = adapter_state_dict(model, "default", bias="lora_only")
    assert set(state) == LORA_KEYS | {
        "out.modules_to_save.default.weight",
        "out.modules_to_save.default.bias",
        "proj.base_layer.bias",
    }
    every_bias = set(adapter_state_dict(model, "default", bias="all")) - set(state)
    assert every_bias == {"flora_head.bias", "lora_A_like.bias"}


def test_load_adapter_state_dict_round_trips_between_models():
    source, target = make(seed=0), make(seed=1)
    assert not torch.allclose(source(IDS), target(IDS))
    state = {k: t.detach().clone() for k, t in adapter_state_dict(source, "default").items()}
    target.load_state_dict(source.state_dict())  # same base weights
    for k, t in adapter_state_dict(make(seed=2), "default").items():  # scramble the adapter again
        adapter_state_dict(target, "default")[k].data.copy_(t)
    load_adapter_state_dict(target, state, "default")
    torch.testing.assert_close(target(IDS), source(IDS))


def test_load_adapter_state_dict_casts_dtype():
    model = make()
    state = {k: torch.ones_like(t, dtype=torch.float16) for k, t in adapter_state_dict(model, "default").items()}
    load_adapter_state_dict(model, state, "default")
    assert model.proj.lora_A["default"].weight.dtype == torch.float32
    assert torch.equal(model.proj.lora_A["default"].weight, torch.ones(2, 8))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_load_missing_key_raises_naming_it_and_copies_nothing():
    model = make()
    before = _snapshot(model)
    state = {k: torch.zeros_like(t) for k, t in adapter_state_dict(model, "default").items()}
    del state["proj.lora_B.default.weight"]
    with pytest.raises(IncompatibleAdapterError, match=r"missing 1 tensors.*proj\.lora_B\.default\.weight"):
        load_adapter_state_dict(model, state, "default")
    _assert_unchanged(model, before)


def test_load_unexpected_key_raises_naming_it_and_copies_nothing():
    model = make()
    before = _snapshot(model)
    state = {k: torch.zeros_like(t) for k, t in adapter_state_dict(model, "default").items()}
    state["flora_head.lora_A.default.weight"] = torch.zeros(2, 8)
    with pytest.raises(IncompatibleAdapterError, match=r"flora_head\.lora_A\.default\.weight"):
        load_adapter_state_dict(model, state, "default")
    _assert_unchanged(model, before)


def test_load_shape_mismatch_names_the_layer_and_both_shapes_and_copies_nothing():
    model = make(r=2)
    before = _snapshot(model)
    state = {k: torch.zeros_like(t) for k, t in adapter_state_dict(make(r=4), "default").items()}
    with pytest.raises(IncompatibleAdapterError) as info:
        load_adapter_state_dict(model, state, "default")
    message = str(info.value)
    assert "proj.lora_A.default.weight: adapter has (4, 8), model expects (2, 8)" in message
    assert "embed.lora_embedding_B.default: adapter has (8, 4), model expects (8, 2)" in message
    _assert_unchanged(model, before)


def test_load_reports_every_kind_of_problem_in_one_error():
    model = make()
    state = {k: torch.zeros_like(t) for k, t in adapter_state_dict(model, "default").items()}
    del state["embed.lora_embedding_A.default"]
    state["proj.lora_A.default.weight"] = torch.zeros(5, 8)
    state["nowhere.lora_A.default.weight"] = torch.zeros(2, 8)
    with pytest.raises(IncompatibleAdapterError) as info:
        load_adapter_state_dict(model, state, "default", source="my_adapter")
    message = str(info.value)
    assert message.startswith("my_adapter")
    assert "shape mismatch" in message and "missing" in message and "nowhere.lora_A" in message
