"""``lorakit merge --quantized nf4 --mode dequant|nf4|original [--merge-into ORIGINAL]``."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.quant import quantize


@pytest.fixture
def setup(tiny_llama, default_model_dir, tmp_path):
    """A tiny Llama folder (with the default tokenizer) and a QLoRA adapter trained on its NF4 version."""
    from transformers import AutoTokenizer

    tiny_llama.save_pretrained(tmp_path / "tiny")
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(tmp_path / "tiny")
    qmodel = copy.deepcopy(tiny_llama)
    quantize(qmodel, "nf4")
    torch.manual_seed(1)
    lorakit.add_adapter(qmodel, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    lorakit.save_adapter(qmodel, tmp_path / "adapter")
    return tmp_path, qmodel


def _merge(tmp_path, *extra: str) -> int:
    base = ["merge", "--model", str(tmp_path / "tiny"), "--adapter", str(tmp_path / "adapter")]
    return main([*base, "--out", str(tmp_path / "out"), *extra])


def test_dequant_merge_writes_a_plain_model_equal_to_the_qlora_model(setup, capsys):
    from transformers import AutoModelForCausalLM

    tmp_path, qmodel = setup
    assert _merge(tmp_path, "--quantized", "nf4") == 0
    out = capsys.readouterr().out
    assert "mode=dequant" in out and "top-1 agreement 100.00%" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, qmodel(ids).logits, atol=1e-5, rtol=0)


def test_merge_into_the_original_reports_drift(setup, capsys):
    tmp_path, _ = setup
    assert _merge(tmp_path, "--quantized", "nf4", "--merge-into", str(tmp_path / "tiny")) == 0
    assert "mode=original" in capsys.readouterr().out and (tmp_path / "out" / "config.json").exists()


def test_merge_into_a_checkpoint_of_other_shapes_names_the_layer(setup, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp_path, _ = setup
    config = LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tmp_path / "tiny").save_pretrained(tmp_path / "other")
    assert _merge(tmp_path, "--quantized", "nf4", "--merge-into", str(tmp_path / "other")) == 1
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.gate_proj" in err and "(96, 32)" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, match",
    [(["--mode", "nf4"], "--quantized nf4"), (["--quantized", "nf4", "--mode", "original"], "--merge-into")],
)
def test_bad_flag_combinations_fail_in_one_line(setup, capsys, flags, match):
    tmp_path, _ = setup
    assert _merge(tmp_path, *flags) == 1
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_nf4_mode_writes_codes_that_load_into_a_quantized_base(setup, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp_path, _ = setup
    assert _merge(tmp_path, "--quantized", "nf4", "--mode", "nf4") == 0
    assert "mode=nf4" in capsys.readouterr().out
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    quantize(fresh, "nf4")
    state = load_file(tmp_path / "out" / "model.safetensors")
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embeddings
    code_keys = [k for k in state if k.endswith(".qweight")]
    assert len(code_keys) == 14 and state[code_keys[0]].dtype == torch.uint8
