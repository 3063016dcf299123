"""Bad input to combine / resize / inspect: each raises the right `LorakitError` naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arith_helpers import CONFIGS, save_random_adapter  # noqa: E402
from safetensors.torch import load_file, save_file

from lorakit.arith import combine, inspect_adapter, resize_adapter
from lorakit.errors import ConfigError, FormatError, IncompatibleAdapterError

WEIGHTS = "adapter_model.safetensors"
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def a(tiny_llama, tmp_path):
    return save_random_adapter(tiny_llama, tmp_path / "a", **CONFIGS["a"])


@pytest.fixture
def c(tiny_llama, tmp_path):
    return save_random_adapter(tiny_llama, tmp_path / "c", seed=1, **CONFIGS["c"])


def _edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _edit_weights(path: Path, edit) -> Path:
    state = load_file(path / WEIGHTS)
    edit(state)
    save_file(state, path / WEIGHTS)
    return path


def test_adapters_of_different_base_models_are_refused(a, c):
    _edit_config(a, base_model_name_or_path="org/model-one")
    _edit_config(c, base_model_name_or_path="org/model-two")
    with pytest.raises(IncompatibleAdapterError, match="different base models.*model-one.*model-two"):
        combine([a, c], [0.5, 0.5])
    assert combine([a, c], [0.5, 0.5], check_base=False).layers  # the documented override


def test_adapters_with_different_shapes_name_the_layer(a, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    other = save_random_adapter(wide, tmp_path / "wide", **CONFIGS["a"])
    with pytest.raises(IncompatibleAdapterError, match=rf"{Q0}: .*\(32, 32\).*\(48, 48\)"):
        combine([a, other], [1, 1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(weights=[1.0]), "1 weights for 2 adapters"),
        (dict(weights=0.5), "one number per adapter"),
        (dict(weights=[1.0, float("nan")]), "finite numbers"),
        (dict(method="mean"), "method='mean' must be one of"),
        (dict(method="linear", rank=2), "use method='svd'"),
        (dict(method="svd", rank=0), "rank=0 must be a positive integer"),
        (dict(method="ties"), "needs density"),
        (dict(method="ties", density=1.5), r"density=1.5 must be a number in \(0, 1\]"),
        (dict(method="svd", density=0.5), "density only applies"),
        (dict(method="ties", density=0.5, majority_sign="max"), "majority_sign"),
    ],
)
def test_bad_combine_arguments_fail_before_reading_anything(a, c, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        combine([a, c], **{"weights": [0.5, 0.5], **kwargs})


def test_combine_refuses_adapters_with_modules_to_save(tiny_llama, a, tmp_path):
    saved = save_random_adapter(tiny_llama, tmp_path / "m", target_modules=["q_proj"], r=4, modules_to_save=["lm_head"])
    with pytest.raises(IncompatibleAdapterError, match="LoRA factors only"):
        combine([a, saved], [1, 1])


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_resize_to_a_non_positive_or_non_integer_rank_is_a_config_error(a, rank):
    with pytest.raises(ConfigError, match="must be a positive integer"):
        resize_adapter(a, rank)


def test_inspect_of_a_truncated_weights_file_is_a_format_error(a):
    data = (a / WEIGHTS).read_bytes()
    (a / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="not a valid safetensors file"):
        inspect_adapter(a)


def test_inspect_of_a_missing_folder_or_config_is_a_format_error(a, tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        inspect_adapter(tmp_path / "nope")
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        inspect_adapter(a)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(f"base_model.model.{Q0}.lora_B.weight"), f"{Q0}: has lora_A but no lora_B"),
        (lambda s: s.update({f"base_model.model.{Q0}.lora_A.weight": torch.randn(3, 32)}), "do not form B @ A"),
        (
            lambda s: s.__setitem__(f"base_model.model.{Q0}.lora_B.weight", torch.full((32, 4), float("nan"))),
            rf"{Q0}\.lora_B\.weight' holds NaN or Inf",  # refused by the loader itself (issue #11), naming the tensor
        ),
        (lambda s: s.clear() or s.update({"x": torch.zeros(1)}), "no LoRA factors"),
    ],
    ids=["missing_B", "rank_mismatch", "nan", "no_lora"],
)
def test_inspect_of_a_corrupt_adapter_names_the_layer(a, edit, message):
    _edit_weights(a, edit)
    with pytest.raises(FormatError, match=message):
        inspect_adapter(a)


def test_weights_whose_rank_differs_from_the_config_are_corrupt(a):
    _edit_config(a, r=8)
    with pytest.raises(FormatError, match="rank 4 in the weights but r=8"):
        resize_adapter(a, 2)


def test_inspect_against_another_model_names_the_layer(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
    )
    with pytest.raises(IncompatibleAdapterError, match=r"model\.layers\.1\.self_attn\.q_proj: no such module"):
        inspect_adapter(a, wide)
    with pytest.raises(IncompatibleAdapterError, match=rf"{Q0}: model weight \(48, 48\), adapter expects \(32, 32\)"):
        inspect_adapter(a, wide)
