"""LoraConfig: PEFT's field names and meaning, validated at construction, round-tripped through JSON dicts."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from tiny_models import tiny_llama as _tiny_llama

from lorakit import ConfigError, FormatError, LoraConfig

SEED_KWARGS = dict(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    lora_dropout=0.05,
    bias="none",
    task_type="CAUSAL_LM",
)


def test_seed_config_from_the_issue_works_as_written():
    config = LoraConfig(**SEED_KWARGS)
    assert config.r == 16 and config.lora_alpha == 32 and config.lora_dropout == 0.05
    assert config.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert config.bias == "none" and config.task_type == "CAUSAL_LM"
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 2.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(r=0), "r=0"),
        (dict(r=-4), "r=-4"),
        (dict(r=8.0), "r=8.0"),
        (dict(r="8"), "r='8'"),
        (dict(r=True), "r=True"),
        (dict(lora_alpha=0), "lora_alpha=0"),
        (dict(lora_alpha=-1.5), "lora_alpha=-1.5"),
        (dict(lora_alpha=float("nan")), "lora_alpha=nan"),
        (dict(lora_alpha=True), "lora_alpha=True"),
        (dict(bias="some"), "bias='some'"),
        (dict(lora_dropout=1.0), "lora_dropout=1.0"),
        (dict(lora_dropout=-0.1), "lora_dropout=-0.1"),
        (dict(lora_dropout="0.1"), "lora_dropout='0.1'"),
        (dict(init_lora_weights="eva"), "init_lora_weights='eva'"),
        (dict(init_lora_weights="uniform"), "init_lora_weights='uniform'"),
        (dict(target_modules="q_proj("), "target_modules='q_proj('"),
        (dict(exclude_modules="q_proj("), "exclude_modules='q_proj('"),
        (dict(rank_pattern={"q_proj(": 4}), "rank_pattern key 'q_proj('"),
        (dict(alpha_pattern={"[": 4}), "alpha_pattern key '['"),
        (
            dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers("),
            "layers_pattern item 'layers('",
        ),
        (dict(target_modules=[]), "target_modules=[]"),
        (dict(target_modules=["q_proj", 3]), "target_modules="),
        (dict(rank_pattern={"q_proj": 4.5}), "rank_pattern"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(alpha_pattern={"q_proj": -2}), "alpha_pattern"),
        (dict(use_rslora="yes"), "use_rslora='yes'"),
        (dict(layers_to_transform=[0, -1]), "layers_to_transform"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
    ],
)
def test_invalid_value_raises_config_error_naming_field_and_value(kwargs, needle):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


def test_several_problems_are_reported_in_one_error():
    with pytest.raises(ConfigError) as info:
        LoraConfig(r=0, lora_alpha=-1, bias="every", lora_dropout=2.0)
    message = str(info.value)
    for needle in ("r=0", "lora_alpha=-1", "bias='every'", "lora_dropout=2.0"):
        assert needle in message


def test_callers_list_is_not_kept_or_mutated():
    targets = ["q_proj", "v_proj"]
    saved = ["lm_head"]
    config = LoraConfig(target_modules=targets, modules_to_save=saved)
    targets.append("k_proj")
    saved.clear()
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.modules_to_save == ("lm_head",)
    assert targets == ["q_proj", "v_proj", "k_proj"]


def test_rank_pattern_dict_is_copied_not_kept():
    pattern = {"q_proj": 4}
    config = LoraConfig(rank_pattern=pattern)
    pattern["q_proj"] = 99
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 4


def test_config_is_frozen():
    config = LoraConfig(**SEED_KWARGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.r = 8  # type: ignore[misc]
    assert dataclasses.replace(config, r=8).r == 8 and config.r == 16


def test_single_string_modules_to_save_becomes_a_one_item_tuple():
    assert LoraConfig(modules_to_save="lm_head").modules_to_save == ("lm_head",)


def test_to_dict_from_dict_round_trip_through_json():
    config = LoraConfig(
        **SEED_KWARGS,
        modules_to_save=["lm_head"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"v_proj": 8},
        layers_to_transform=[1],
        layers_pattern="layers",
        use_rslora=True,
        init_lora_weights="gaussian",
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["peft_type"] == "LORA"
    assert data["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert data["use_dora"] is False
    assert LoraConfig.from_dict(data) == config


def test_to_dict_is_readable_by_peft():
    peft = pytest.importorskip("peft")
    config = LoraConfig(**SEED_KWARGS, rank_pattern={"v_proj": 4})
    theirs = peft.LoraConfig(**{k: v for k, v in config.to_dict().items() if k != "peft_type"})
    assert (
        theirs.r == 16 and theirs.lora_alpha == 32 and set(theirs.target_modules) == set(SEED_KWARGS["target_modules"])
    )
    assert theirs.rank_pattern == {"v_proj": 4}


def test_from_dict_reads_a_peft_written_config():
    peft = pytest.importorskip("peft")
    data = peft.LoraConfig(**SEED_KWARGS).to_dict()
    data = json.loads(json.dumps(data, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    config = LoraConfig.from_dict(data)
    assert (
        config.r == 16 and config.lora_alpha == 32 and set(config.target_modules) == set(SEED_KWARGS["target_modules"])
    )


@pytest.mark.parametrize(
    "feature",
    [{"use_qalora": True}, {"lora_bias": True}, {"layer_replication": [[0, 1]]}, {"trainable_token_indices": [1, 2]}],
)
def test_from_dict_refuses_features_lorakit_cannot_honour(feature):
    data = {**LoraConfig(**SEED_KWARGS).to_dict(), **feature}
    with pytest.raises(FormatError) as info:
        LoraConfig.from_dict(data)
    assert next(iter(feature)) in str(info.value)


def test_from_dict_refuses_other_peft_types():
    with pytest.raises(FormatError, match="IA3"):
        LoraConfig.from_dict({"peft_type": "IA3", "target_modules": ["q_proj"]})


def test_from_dict_wraps_invalid_values_as_format_error_naming_the_source():
    with pytest.raises(FormatError, match=r"cfg\.json.*r=0"):
        LoraConfig.from_dict({"peft_type": "LORA", "r": 0}, source="cfg.json")


def test_from_dict_ignores_unknown_peft_keys():
    config = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "revision": None, "megatron_config": None})
    assert config.r == 4


def test_scaling_is_alpha_over_r():
    assert LoraConfig(r=8, lora_alpha=16).scaling_for("x.q_proj") == 2.0


def test_rslora_scaling_is_alpha_over_sqrt_r():
    config = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert config.scaling_for("x.q_proj") == pytest.approx(8 / math.sqrt(16))


def test_rank_and_alpha_patterns_override_per_module_suffix():
    config = LoraConfig(
        r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2}
    )
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert config.alpha_for("model.layers.1.self_attn.q_proj") == 2
    assert config.alpha_for("model.layers.0.self_attn.q_proj") == 16
    assert config.scaling_for("model.layers.0.self_attn.v_proj") == 4.0  # 16 / 4
    # A suffix, not a substring: "proj" is not a dotted suffix of "q_proj".
    assert LoraConfig(r=8, rank_pattern={"proj": 2}).rank_for("model.q_proj") == 8


@pytest.mark.parametrize(
    ("rank_pattern", "alpha_pattern"),
    [
        ({"v_proj": 4}, {"v_proj": 2}),
        ({r"layers\.1\.self_attn\.q_proj": 2, "o_proj": 6}, {"q_proj": 64}),
        ({r"model\.layers\.0\..*": 3}, {}),
    ],
)
def test_rank_and_alpha_patterns_match_peft_per_module(rank_pattern, alpha_pattern):
    peft = pytest.importorskip("peft")
    import lorakit
    from lorakit.layers import iter_lora_layers

    kwargs = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    ours = lorakit.add_adapter(
        _tiny_llama(), LoraConfig(**kwargs, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    )
    theirs = peft.get_peft_model(
        _tiny_llama(), peft.LoraConfig(**kwargs, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    )
    ours_r = {p: (layer.r["default"], layer.scaling["default"]) for p, layer in iter_lora_layers(ours)}
    theirs_r = {
        p.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for p, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert ours_r == theirs_r
