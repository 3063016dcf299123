"""lorakit's default-target table says what PEFT's says, for every architecture both know."""

from __future__ import annotations

from lorakit.default_targets import DEFAULT_TARGETS_BY_MODEL_TYPE


def test_table_equals_installed_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    ours = {k: v if isinstance(v, str) else sorted(v) for k, v in DEFAULT_TARGETS_BY_MODEL_TYPE.items()}
    theirs = {k: v if isinstance(v, str) else sorted(v) for k, v in PEFT.items()}
    shared = set(ours) & set(theirs)
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert {"llama", "mistral", "qwen2", "gpt2", "gpt_neox", "falcon", "opt"} <= shared


def test_train_info_and_sweep_share_the_one_default():
    from lorakit.training.grid import TARGET_SETS
    from lorakit.training.train_config import TrainConfig

    assert TrainConfig().target_modules is None and TARGET_SETS["default"] is None
