"""The `lorakit` command: info, merge, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.cli import main


@pytest.fixture
def tiny_dir(tiny_llama, default_model_dir, tmp_path):
    """A tiny Llama saved as an ordinary HF folder, with the default model's tokenizer."""
    from transformers import AutoTokenizer

    tiny_llama.config.vocab_size = 128
    tiny_llama.save_pretrained(tmp_path / "tiny")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_info_reports_targets_and_lora_parameter_count(tiny_dir, capsys):
    assert main(["info", str(tiny_dir), "--json", "--target-modules", "q_proj,v_proj", "--r", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target_modules"] == ["q_proj", "v_proj"] and report["targeted"] == 4
    # r * (in + out) per module: q 32x32, v 16x32 (2 kv heads of 8)
    assert report["lora_parameters"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    model = lorakit.load_model(str(tiny_dir))[0]
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert lorakit.trainable_parameters(model)[0] == report["lora_parameters"]


def test_info_on_the_default_model_all_linear(default_model_dir, capsys):
    assert main(["info", "smollm2-135m-instruct", "--target-modules", "all-linear", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["targeted"] == 30 * 7 and "lm_head" not in report["target_modules"]
    assert report["parameters"] == 134_515_008


def test_merge_writes_a_plain_hf_model_with_the_adapter_folded_in(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = lorakit.load_model(str(tiny_dir))[0]
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert (
        main(["merge", "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")])
        == 0
    )
    assert "max |logit change|" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert "lorakit" not in (tmp_path / "m" / "config.json").read_text()
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)


def test_merge_refuses_to_overwrite_a_folder_with_files(tiny_dir, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--model", str(tiny_dir), "--adapter", str(tmp_path), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["info", "no-such-model"], "neither an embedded model name"),
        (["info", "smollm2", "--r", "0"], "r=0 must be a positive integer"),
        (["info", "smollm2", "--target-modules", "q_prj"], "Similar names"),
        (["info"], "required: model"),
        (
            ["merge", "--model", "smollm2", "--adapter", "/nonexistent", "--out", "/tmp/x-lorakit-never"],
            "does not exist",
        ),
    ],
)
def test_bad_input_prints_one_line_and_exits_non_zero(default_model_dir, argv, expected):
    env = {**os.environ, "LORAKIT_HOME": os.environ.get("LORAKIT_HOME", str(default_model_dir.parents[1]))}
    proc = subprocess.run(
        [sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lorakit: error")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr


def test_cli_weight_choices_are_the_engine_formats():
    from lorakit.cli.options import WEIGHT_FORMATS as CLI_FORMATS
    from lorakit.inference.weights import WEIGHT_FORMATS

    assert CLI_FORMATS == WEIGHT_FORMATS
