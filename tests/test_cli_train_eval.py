"""``lorakit train`` / ``lorakit eval`` through their argument parsers, on a tiny model saved as an HF folder."""

import argparse
import json

import pytest
from train_helpers import make_char_tokenizer, make_tiny_llama, pc_rows, write_jsonl

from lorakit.cli.options import add_train_arguments
from lorakit.commands.eval import add_args as add_eval_arguments
from lorakit.commands.eval import run as eval_from_args
from lorakit.commands.train import run as train_from_args


@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(d)
    make_char_tokenizer().save_pretrained(d)
    return d


def parse(add, *argv):
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args([str(a) for a in argv])


def test_train_then_eval_from_the_command_line(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", pc_rows(40))
    evald = write_jsonl(tmp_path / "eval.jsonl", pc_rows(6, seed=9))
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\nmax_steps: 50\nlearning_rate: 5e-3\n")
    args = parse(add_train_arguments, "--config", cfg, "--data", data, "--eval-data", evald, "--output-dir", out,
                 "--max-steps", 4, "--batch-size", 4, "--no-progress", "--precision", "fp32")  # fmt: skip
    assert train_from_args(args) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "exact_match" in printed and "trained 4 steps" in printed
    results = json.loads((out / "eval_results.json").read_text())
    assert results["steps"] == 4 and results["adapter_bytes"] > 0

    args = parse(add_eval_arguments, "--model", tiny_dir, "--adapter", out, "--data", evald, "--json",
                 "--max-new-tokens", 4, "--precision", "fp32")  # fmt: skip
    assert eval_from_args(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6 and set(report) >= {"base", "adapter", "samples"}
    assert report["adapter"]["eval_loss"] == pytest.approx(results["after"]["eval_loss"], rel=1e-4)
    assert report["base"]["eval_loss"] == pytest.approx(results["before"]["eval_loss"], rel=1e-4)
