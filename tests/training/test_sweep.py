"""`lorakit sweep`: one run per grid point (real training in subprocesses), a table, a plot, best and cheapest."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import pc_rows, write_jsonl

from lorakit.errors import ConfigError
from lorakit.training.grid import grid, pick, run_sweep


@pytest.fixture
def tiny_dir(default_model_dir, tmp_path):
    """A tiny random Llama with the default model's tokenizer (vocabulary included), as an HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_sweep_trains_every_grid_point_and_marks_best_and_cheapest(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", pc_rows(40))
    base = {"model": str(tiny_dir), "data": str(data), "max_steps": 3, "batch_size": 4, "eval_generate": False,
            "progress": False, "precision": "fp32", "learning_rate": 1e-2, "lora_dropout": 0.0}  # fmt: skip
    result = run_sweep(base, tmp_path / "sweep", ranks=[2, 4], targets=["attention", "all-linear"])
    assert result.metric == "eval_loss" and len(result.rows) == 4
    by_name = {r["name"]: r for r in result.rows}
    assert by_name["r2-a4-attention"]["trainable_params"] == 2 * (2 * (32 + 32) * 2 + 2 * (32 + 16) * 2)
    assert by_name["r4-a8-all-linear"]["trainable_params"] > by_name["r4-a8-attention"]["trainable_params"]
    assert all(r["status"] == "completed" and r["peak_rss_gib"] > 0 and r["eval_loss"] > 0 for r in result.rows)
    assert (tmp_path / "sweep" / "r2-a4-attention" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["best"] == result.best and saved["cheapest_within_tolerance"] == result.cheapest
    assert "| r2-a4-attention |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_cheapest_within_one_point_of_the_best():
    rows = [
        {"name": "big", "trainable_params": 100, "exact_match": 0.95},
        {"name": "mid", "trainable_params": 50, "exact_match": 0.945},
        {"name": "small", "trainable_params": 10, "exact_match": 0.90},
    ]
    assert pick(rows, "exact_match", 0.01) == ("big", "mid")
    loss_rows = [{"name": "a", "trainable_params": 9, "eval_loss": 0.50}, {"name": "b", "trainable_params": 3,
                                                                           "eval_loss": 0.504}]  # fmt: skip
    assert pick(loss_rows, "eval_loss", 0.01) == ("a", "b")


def test_bad_grids_are_refused():
    with pytest.raises(ConfigError, match="target sets"):
        grid([8], None, ["mlp-only"])
    with pytest.raises(ConfigError, match="no run reported exact_match"):
        pick([{"name": "x", "trainable_params": 1, "exact_match": None}], "exact_match", 0.01)


def test_the_grid_sweeps_lora_variants():
    specs = grid([8], None, ["attention"], ["lora", "dora", "pissa"])
    assert [s["name"] for s in specs] == ["r8-a16-attention-lora", "r8-a16-attention-dora", "r8-a16-attention-pissa"]
    assert [s["name"] for s in grid([8], None, ["attention"])] == ["r8-a16-attention"]  # names unchanged without
    with pytest.raises(ConfigError, match="variants"):
        grid([8], None, ["attention"], ["vera"])
