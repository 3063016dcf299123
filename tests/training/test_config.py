import argparse

import pytest

from lorakit.cli import COMMANDS
from lorakit.cli.options import add_train_arguments, config_from_args
from lorakit.errors import ConfigError
from lorakit.training.train_config import TrainConfig, build_config


def parse(*argv):
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    return p.parse_args(list(argv))


def test_defaults_are_the_documented_ones():
    c = TrainConfig()
    assert (c.model, c.r, c.lora_alpha, c.lora_dropout) == ("smollm2-135m-instruct", 16, None, 0.05)
    assert c.target_modules is None and c.lr_scheduler == "cosine"  # None: PEFT's default for the architecture
    assert (c.revision, c.dtype) == (None, "fp32")


def test_flags_override_the_yaml_file_which_overrides_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1e-3\nbatch_size: 4\nmax-steps: 10\ntarget_modules: [q_proj]\n")
    c = config_from_args(parse("--config", str(f), "--batch-size", "2", "--data", "d.jsonl"))
    assert c.learning_rate == 1e-3  # "1e-3" is a string to YAML 1.1; coerced
    assert (c.batch_size, c.max_steps, c.data, c.target_modules) == (2, 10, "d.jsonl", ("q_proj",))
    assert c.r == 16


def test_every_config_key_has_a_flag():
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    flags = {a.dest for a in p._actions}
    assert {"r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "batch_size",
            "gradient_accumulation_steps", "seed", "max_length", "max_steps", "output_dir", "data",
            "eval_data", "resume", "overwrite", "skip_bad_lines", "gradient_checkpointing",
            "loraplus_lr_ratio", "config"} <= flags  # fmt: skip
    assert parse("--no-eval-generate").eval_generate is False
    assert {"train", "eval"} <= set(COMMANDS)


@pytest.mark.parametrize("argv, expected", [
    (["--target-modules", "q_proj", "v_proj"], ("q_proj", "v_proj")),
    (["--target-modules", "q_proj,v_proj"], ("q_proj", "v_proj")),
    (["--target-modules", "all-linear"], "all-linear"),
    (["--target-modules", r".*\.(q|v)_proj"], r".*\.(q|v)_proj"),
])  # fmt: skip
def test_target_modules_flag_forms(argv, expected):
    assert config_from_args(parse(*argv)).target_modules == expected


def test_learning_rate_that_is_not_a_number_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse("--learning-rate", "fast")
    assert "invalid float value: 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, msg", [
    ("learning_rate: fast\n", "learning_rate='fast'"),
    ("learning_rate: -1\n", "learning_rate=-1"),
    ("max_steps: 0\n", "max_steps=0"),
    ("num_epochs: -2\n", "num_epochs=-2"),
    ("lerning_rate: 1e-3\n", "unknown keys \\['lerning_rate'\\]; did you mean \\['learning_rate'\\]"),
    ("- a\n- b\n", "must hold a mapping"),
])  # fmt: skip
def test_bad_yaml_values_are_refused_with_the_key(tmp_path, yaml_text, msg):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=msg):
        build_config(f)


def test_missing_config_file_and_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="--data and --output-dir"):
        TrainConfig().require_paths()


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ConfigError, match="pick one"):
        TrainConfig(resume=True, overwrite=True)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        TrainConfig().r = 4  # type: ignore[misc]


def test_lorakit_train_is_a_function_beside_the_training_package():
    import lorakit
    import lorakit.training

    assert callable(lorakit.train) and lorakit.training.TrainConfig is TrainConfig
    with pytest.raises(ConfigError, match="--data and --output-dir"):
        lorakit.train(max_steps=1)
