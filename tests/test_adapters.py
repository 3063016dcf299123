"""Model-level verbs: add / set / disabled / delete / merge / unload, trainable flags and counts against PEFT."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit import AdapterExistsError, AdapterNotFoundError, ConfigError, LoraConfig, MergeError
from lorakit.layers import LoraLayer

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peft_model(model: nn.Module, **kwargs) -> nn.Module:
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
RANDOM = dict(init_lora_weights=False)  # adapters that change the output, so the checks below mean something


# ---- trainable parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "kwargs"),
    [
        (tiny_llama, dict(r=8, target_modules=ATTN)),
        (tiny_llama, dict(r=16, target_modules=ATTN)),
        (tiny_llama, dict(r=8, target_modules="all-linear")),
        (tiny_llama, dict(r=16, target_modules="all-linear")),
        (tiny_llama, dict(r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])),
        (tiny_gpt2, dict(r=4, target_modules=["c_attn"], bias="all")),
        (tiny_gpt2, dict(r=4, target_modules=["c_attn"], bias="lora_only")),
        (tiny_gpt2, dict(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"], bias="all")),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_add_adapter_freezes_all_but_what_peft_trains(make, kwargs):
    ours = lorakit.add_adapter(make(), LoraConfig(**kwargs))
    theirs = peft_model(make(), **kwargs)
    ours_names = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    theirs_names = sorted(n.removeprefix("base_model.model.") for n, p in theirs.named_parameters() if p.requires_grad)
    assert ours_names == theirs_names
    assert lorakit.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_print_trainable_parameters_line_matches_peft(capsys):
    ours = lorakit.add_adapter(tiny_llama(), LoraConfig(r=8, target_modules=ATTN))
    line = lorakit.print_trainable_parameters(ours)
    assert capsys.readouterr().out.strip() == line
    peft_model(tiny_llama(), r=8, target_modules=ATTN).print_trainable_parameters()
    assert capsys.readouterr().out.strip() == line
    assert line == "trainable params: 3,584 || all params: 30,368 || trainable%: 11.8019"


def test_trainable_false_adds_a_frozen_adapter_and_leaves_the_trained_one_alone():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"]), "trained")
    flags = {n: p.requires_grad for n, p in model.named_parameters() if "v_proj" not in n}
    lorakit.add_adapter(model, LoraConfig(target_modules=["v_proj"]), "frozen", trainable=False)
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in flags} == flags
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)
    assert lorakit.trainable_parameters(model)[0] == 2 * (16 * 32 + 32 * 16)  # q_proj of "trained", 2 layers


def test_trainable_false_on_the_first_adapter_freezes_the_base_too():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"]), trainable=False)
    assert lorakit.trainable_parameters(model)[0] == 0


# ---- several adapters ----------------------------------------------------------------------------------------
def _two_adapters() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"], **RANDOM), "a")
    lorakit.add_adapter(model, LoraConfig(r=3, lora_alpha=5, target_modules=["0"], **RANDOM), "b")
    return model, torch.randn(4, 8)


def test_active_adapters_add_their_updates():
    model, x = _two_adapters()
    assert lorakit.active_adapters(model) == ["b"]  # the newest added adapter becomes the active one
    base = model[0].base_layer(x)
    lorakit.set_adapter(model, "a")
    only_a = model(x)
    lorakit.set_adapter(model, "b")
    only_b = model(x)
    lorakit.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(model(x), base + (only_a - base) + (only_b - base), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), base + model[0].lora_forward(x, "a") + model[0].lora_forward(x, "b"))


def test_merging_two_active_adapters_equals_their_sum():
    model, x = _two_adapters()
    lorakit.set_adapter(model, ["a", "b"])
    both = model(x)
    lorakit.merge(model)
    torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-5)
    assert model[0].merged_adapters == ["a", "b"]


def test_set_adapter_while_another_is_merged_raises():
    model, _ = _two_adapters()
    lorakit.merge(model)
    with pytest.raises(MergeError, match="unmerge"):
        lorakit.set_adapter(model, "a")


def test_adding_an_adapter_while_another_is_merged_raises_before_changing_the_model():
    model, x = _two_adapters()
    lorakit.merge(model)
    merged = model(x)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(MergeError, match="unmerge"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"]), "c")
    assert lorakit.list_adapters(model) == ["a", "b"] and model[0].adapter_names == ["a", "b"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(model(x), merged)
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"]), "c", activate=False)  # inactive is fine
    assert lorakit.active_adapters(model) == ["b"]


def test_merging_an_inactive_adapter_raises():
    model, _ = _two_adapters()
    with pytest.raises(MergeError, match="not active"):
        lorakit.merge(model, "a")


# ---- disabled() ----------------------------------------------------------------------------------------------
def test_disabled_gives_base_outputs_and_restores():
    model = tiny_llama()
    base = logits(model, IDS)
    lorakit.add_adapter(model, LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"], **RANDOM))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.5)
    adapted = logits(model, IDS)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with lorakit.disabled(model):
        assert torch.equal(logits(model, IDS), base)
    assert torch.equal(logits(model, IDS), adapted)


def test_disabled_restores_even_if_the_body_raises():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=ATTN, **RANDOM))
    adapted = logits(model, IDS)
    with pytest.raises(RuntimeError, match="boom"), lorakit.disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(logits(model, IDS), adapted)
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


def test_disabled_on_a_merged_model_gives_base_outputs_and_re_merges():
    model = tiny_llama()
    base = logits(model, IDS)
    lorakit.add_adapter(model, LoraConfig(target_modules=ATTN, **RANDOM))
    lorakit.merge(model)
    merged_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    merged = logits(model, IDS)
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, IDS), base, rtol=1e-5, atol=1e-5)
    assert model.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, merged_weight)
    torch.testing.assert_close(logits(model, IDS), merged, rtol=1e-5, atol=1e-5)


# ---- delete --------------------------------------------------------------------------------------------------
def test_deleting_the_last_adapter_restores_plain_modules_and_requires_grad_flags():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice, from before lorakit
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]
    base = logits(model, IDS)
    lorakit.add_adapter(model, LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"], **RANDOM))
    lorakit.delete_adapter(model, "default")
    assert [type(m) for m in model.modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert lorakit.list_adapters(model) == [] and "_lorakit" not in model.__dict__
    assert torch.equal(logits(model, IDS), base)


def test_deleting_one_of_two_adapters_frees_its_modules_and_keeps_the_other():
    model, x = _two_adapters()
    lorakit.set_adapter(model, "a")
    only_a = model(x)
    lorakit.delete_adapter(model, "b")
    assert "b" not in model[0].lora_A and "b" not in model[0].lora_B and "b" not in model[0].lora_dropout
    assert "b" not in model[0].r and "b" not in model[0].scaling
    assert not any(".b." in n for n, _ in model.named_parameters())
    assert lorakit.list_adapters(model) == ["a"]
    torch.testing.assert_close(model(x), only_a)


def test_deleting_a_merged_adapter_raises():
    model, _ = _two_adapters()
    lorakit.merge(model)
    with pytest.raises(MergeError):
        lorakit.delete_adapter(model, "b")


# ---- errors --------------------------------------------------------------------------------------------------
def test_adding_an_existing_name_raises_adapter_exists():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterExistsError, match="'default'"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["v_proj"]))
    assert not isinstance(model.model.layers[0].self_attn.v_proj, LoraLayer)


@pytest.mark.parametrize("verb", [lorakit.delete_adapter, lorakit.set_adapter, lorakit.get_config])
def test_unknown_adapter_raises_not_found_listing_the_loaded_ones(verb):
    model, _ = _two_adapters()
    with pytest.raises(AdapterNotFoundError) as info:
        verb(model, "c")
    assert "'c'" in str(info.value) and "['a', 'b']" in str(info.value)


@pytest.mark.parametrize("name", ["", "my.adapter", "__base__", 3])
def test_invalid_adapter_name_raises_config_error(name):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="adapter name"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"]), name)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_peft_config_object_is_refused_with_a_config_error():
    peft = pytest.importorskip("peft")
    with pytest.raises(ConfigError, match="lorakit.LoraConfig"):
        lorakit.add_adapter(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))


# ---- config ---------------------------------------------------------------------------------------------------
def test_get_config_records_the_adapted_modules():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules="all-linear"))
    config = lorakit.get_config(model)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
