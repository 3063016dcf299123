"""`lorakit check`: one fixture adapter per runtime rule, the verdicts, exit status and command lines."""

from __future__ import annotations

import pytest
import torch
from export_helpers import tiny_llama_base, write_adapter

from lorakit.cli import main
from lorakit.export import adapter_facts, read_adapter_files
from lorakit.runtimes import BLOCKING, RULES, RUNTIMES, check, command, servable

_MTS = {"modules_to_save": ["lm_head"]}
_BIAS = {"bias": "all", "extra": {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}}
_PATTERNS = {"rank_pattern": {"o_proj": 8}, "ranks": {"o_proj": 8}, "alpha_pattern": {"v_proj": 3}}
_EXTRA = {"extra": {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}}
# rule id -> (adapter settings that trigger it, base facts known?)
RULE_FIXTURES: dict[str, tuple[dict, bool]] = {
    "vllm-modules-to-save": (_MTS, True),
    "vllm-dora": ({"use_dora": True}, True),
    "vllm-rank-limit": ({"r": 520}, True),
    "vllm-max-lora-rank": ({"r": 20}, True),
    "vllm-bias": (_BIAS, True),
    "vllm-targets": ({"targets": ("q_proj", "rotary_emb")}, True),
    "vllm-scaling-patterns": (_PATTERNS, True),
    "vllm-unchecked-arch": ({}, False),
    "llamacpp-modules-to-save": (_MTS, True),
    "llamacpp-dora": ({"use_dora": True, **_EXTRA}, True),
    "llamacpp-bias": (_BIAS, True),
    "llamacpp-extra-tensors": (_EXTRA, True),
    "llamacpp-targets": ({"targets": ("q_proj", "lm_head")}, True),
    "llamacpp-rslora": ({"use_rslora": True}, True),
    "llamacpp-scaling-patterns": (_PATTERNS, True),
    "llamacpp-unresolved-base": ({}, False),
    "lorax-modules-to-save": (_MTS, True),
    "lorax-dora": ({"use_dora": True}, True),
    "lorax-bias": (_BIAS, True),
    "lorax-targets": ({"targets": ("q_proj", "embed_tokens")}, True),
    "lorax-partial-layers": ({"layers": (1,), "layers_to_transform": [1]}, True),
    "lorax-scaling-patterns": (_PATTERNS, True),
    "tgi-modules-to-save": (_MTS, True),
    "tgi-dora": ({"use_dora": True}, True),
    "tgi-bias": (_BIAS, True),
    "tgi-targets": ({"targets": ("q_proj", "lm_head")}, True),
    "tgi-partial-layers": ({"layers": (0,), "layers_to_transform": [0]}, True),
    "tgi-scaling-patterns": (_PATTERNS, True),
    "peft-no-base-name": ({"base_model_name_or_path": None}, True),
}


def facts_for(tmp_path, settings: dict, known_base: bool):
    folder = write_adapter(tmp_path / "adapter", **settings)
    return adapter_facts(read_adapter_files(folder), tiny_llama_base() if known_base else None)


def test_every_rule_has_a_fixture_adapter():
    assert set(RULE_FIXTURES) == {rule.id for rule in RULES}


@pytest.mark.parametrize("rule_id", sorted(RULE_FIXTURES))
def test_rule_fires_on_its_fixture_adapter(tmp_path, rule_id):
    rule = next(r for r in RULES if r.id == rule_id)
    settings, known_base = RULE_FIXTURES[rule_id]
    findings = check(facts_for(tmp_path, dict(settings), known_base), rule.runtime)
    assert rule_id in {f.rule.id for f in findings}
    assert servable(findings) is (rule.severity not in BLOCKING)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_plain_adapter_is_served_by_every_runtime(tmp_path, runtime):
    findings = check(facts_for(tmp_path, {}, True), runtime)
    assert findings == [] and servable(findings)


def test_vllm_command_names_the_smallest_max_lora_rank_that_fits(tmp_path):
    facts = facts_for(tmp_path, {"r": 20}, True)
    line = command(facts, "vllm")
    assert line == f"vllm serve tiny-llama --enable-lora --lora-modules adapter={facts.path} --max-lora-rank 32"


def test_partial_layers_count_against_the_base_layer_count(tmp_path):
    facts = facts_for(tmp_path, {"layers": (0, 1)}, True)
    assert facts.partial_targets == frozenset()
    deeper = adapter_facts(read_adapter_files(facts.path), tiny_llama_base(n_layer=3))
    assert deeper.partial_targets == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_check_cli_exit_status_and_output(tmp_path, capsys):
    ok = write_adapter(tmp_path / "ok")
    bad = write_adapter(tmp_path / "bad", use_dora=True)
    assert main(["check", str(ok), "--for", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "can serve" in out and f"--lora-modules ok={ok} --max-lora-rank 8" in out
    assert "e745baf" in out  # the version the rules were read from
    assert main(["check", str(bad), "--for", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "cannot serve" in out and "[rejects] vllm-dora" in out


def test_check_cli_bad_adapter_is_one_line_error(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing"), "--for", "tgi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and err.count("\n") == 1
