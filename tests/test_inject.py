"""Target matching and injection: PEFT's rules (list = name or dotted suffix, string = full regex), checked
against the real ``peft`` package on a tiny Llama and a tiny GPT-2."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn

import lorakit
from lorakit import ConfigError, LoraConfig, TargetNotFoundError
from lorakit.inject import matches
from lorakit.layers import LoraLayer, ModulesToSave, iter_lora_layers

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def peft_targets(model: nn.Module, **kwargs) -> list[str]:
    """The module names PEFT wraps with LoRA for ``kwargs`` (a fresh ``get_peft_model``)."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in wrapped.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    )


def our_targets(model: nn.Module, **kwargs) -> list[str]:
    return sorted(lorakit.find_targets(model, LoraConfig(**kwargs)))


# ---- the matching rule ---------------------------------------------------------------------------------------
def test_list_item_matches_name_or_dotted_suffix_only():
    name = "model.layers.0.self_attn.q_proj"
    assert matches(("q_proj",), name)
    assert matches(("self_attn.q_proj",), name)
    assert matches((name,), name)
    assert not matches(("proj",), name)  # a suffix of the string, but not a dotted one
    assert not matches(("attn.q_proj",), name)


def test_string_is_a_full_regex_match_not_a_search():
    name = "model.layers.0.self_attn.q_proj"
    assert matches(r".*\.q_proj", name)
    assert not matches("q_proj", name)
    assert not matches(r".*\.q_pro", name)


# ---- against PEFT --------------------------------------------------------------------------------------------
LLAMA_CASES = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=list(ATTN)),
    dict(target_modules="all-linear"),
    dict(target_modules=r".*\.(q_proj|v_proj)"),
    dict(target_modules=r"model\.layers\.1\.mlp\.(gate|up|down)_proj"),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0]),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
    dict(target_modules=["q_proj", "embed_tokens"]),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
]
GPT2_CASES = [
    dict(target_modules=["c_attn"]),
    dict(target_modules="all-linear"),
    dict(target_modules=None),
    dict(target_modules=["c_proj"], layers_to_transform=[0], layers_pattern="h"),
    dict(target_modules=r".*mlp\.c_fc"),
    dict(target_modules=["c_attn", "c_proj"], exclude_modules=r".*mlp.*"),
]


@pytest.mark.parametrize("kwargs", LLAMA_CASES, ids=str)
def test_targets_equal_peft_on_tiny_llama(kwargs):
    assert our_targets(tiny_llama(), **kwargs) == peft_targets(tiny_llama(), **kwargs)


@pytest.mark.parametrize("kwargs", GPT2_CASES, ids=str)
def test_targets_equal_peft_on_tiny_gpt2(kwargs):
    assert our_targets(tiny_gpt2(), **kwargs) == peft_targets(tiny_gpt2(), **kwargs)


def test_all_linear_excludes_the_output_head():
    targets = our_targets(tiny_llama(), target_modules="all-linear")
    assert "lm_head" not in targets
    assert len(targets) == 2 * 7  # q k v o gate up down per layer


def test_target_none_means_peft_default_for_the_architecture():
    targets = our_targets(tiny_llama(), target_modules=None)
    assert targets == peft_targets(tiny_llama(), target_modules=None)
    assert targets == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))


def test_target_none_on_a_model_peft_has_no_default_for_names_the_choices():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetNotFoundError, match=r"has none, as in PEFT.*'all-linear'"):
        lorakit.find_targets(model, LoraConfig(target_modules=None))


def test_exclude_modules_wins_over_target_modules():
    targets = our_targets(tiny_llama(), target_modules=list(ATTN), exclude_modules=r"model\.layers\.0\..*")
    assert targets == sorted(f"model.layers.1.self_attn.{p}" for p in ATTN)


def test_layers_to_transform_selects_layer_indices():
    targets = our_targets(tiny_llama(), target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert targets == ["model.layers.1.self_attn.q_proj"]


def test_layers_to_transform_is_not_ignored_with_all_linear():
    targets = our_targets(tiny_llama(), target_modules="all-linear", layers_to_transform=[0])
    assert targets and all(t.startswith("model.layers.0.") for t in targets)


def test_modules_to_save_are_excluded_from_targets():
    targets = our_targets(tiny_llama(), target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    assert "lm_head" not in targets and "model.layers.0.self_attn.q_proj" in targets


# ---- errors --------------------------------------------------------------------------------------------------
def test_no_match_raises_target_not_found_with_close_names():
    with pytest.raises(TargetNotFoundError) as info:
        lorakit.find_targets(tiny_llama(), LoraConfig(target_modules=["q_prj"]))
    assert "'q_proj'" in str(info.value) and "q_prj" in str(info.value)


def test_regex_without_dotted_prefix_raises_target_not_found():
    with pytest.raises(TargetNotFoundError, match="full regex match"):
        lorakit.find_targets(tiny_llama(), LoraConfig(target_modules="q_proj"))


def test_layers_to_transform_out_of_range_raises_naming_it():
    with pytest.raises(TargetNotFoundError, match="layers_to_transform"):
        lorakit.find_targets(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_unsupported_module_type_raises_config_error():
    with pytest.raises(ConfigError, match="LlamaAttention"):
        lorakit.find_targets(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_regex_matching_an_activation_is_refused_like_peft():
    with pytest.raises(ConfigError, match="act_fn"):
        lorakit.find_targets(tiny_llama(), LoraConfig(target_modules=r"model\.layers\.1\.mlp\..*"))


def test_multihead_attention_projection_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ConfigError, match="out_proj"):
        lorakit.find_targets(model, LoraConfig(target_modules=["out_proj"]))


def test_unknown_modules_to_save_raises_target_not_found():
    with pytest.raises(TargetNotFoundError, match="modules_to_save"):
        lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_failed_injection_leaves_the_model_unchanged():
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    with pytest.raises(TargetNotFoundError):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))
    assert [type(m) for m in model.modules()] == before
    assert lorakit.list_adapters(model) == []


# ---- injection -----------------------------------------------------------------------------------------------
def test_find_targets_is_pure():
    model = tiny_llama()
    before = [type(m) for m in model.modules()]
    lorakit.find_targets(model, LoraConfig(target_modules="all-linear"))
    assert [type(m) for m in model.modules()] == before


def test_second_adapter_reuses_the_wrapper_and_does_not_wrap_twice():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"]), "a")
    lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"]), "b")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLayer) and not isinstance(q.base_layer, LoraLayer)
    assert q.adapter_names == ["a", "b"]
    assert model.model.layers[0].self_attn.v_proj.adapter_names == ["b"]
    assert sum(1 for _ in iter_lora_layers(model)) == 4


def test_modules_to_save_wraps_the_module_with_a_trainable_copy():
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSave)
    copy = model.lm_head.modules_to_save["default"]
    assert copy.weight.requires_grad and not model.lm_head.original_module.weight.requires_grad
    assert copy.weight.data_ptr() != model.lm_head.original_module.weight.data_ptr()


@pytest.mark.parametrize(
    ("make", "kwargs"),
    [(tiny_llama, kw) for kw in [*LLAMA_CASES, dict(target_modules="all-linear", layers_to_transform=[0])]]
    + [(tiny_gpt2, kw) for kw in GPT2_CASES],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_recorded_config_selects_the_same_modules_in_lorakit_and_peft(make, kwargs):
    """What adapter_config.json records (`get_config`) must re-select exactly the adapted modules, in both."""
    wanted = our_targets(make(), **kwargs)
    recorded = lorakit.get_config(lorakit.add_adapter(make(), LoraConfig(**kwargs)))
    assert sorted(lorakit.find_targets(make(), recorded)) == wanted
    as_json = {k: v for k, v in recorded.to_dict().items() if k != "peft_type"}
    assert peft_targets(make(), **as_json) == wanted


def test_seq_cls_task_trains_the_new_head_like_peft():
    """Without this, a SEQ_CLS adapter trains LoRA on a randomly initialised, frozen `score` head."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def make():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            num_labels=3,
            pad_token_id=0,
        )
        return LlamaForSequenceClassification(cfg)

    ours = lorakit.add_adapter(make(), LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    theirs = get_peft_model(make(), PeftLoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    assert isinstance(ours.score, ModulesToSave)
    assert lorakit.get_config(ours).modules_to_save == ("score",)
    assert lorakit.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
