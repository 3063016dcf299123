"""`lorakit combine`, `lorakit resize`, `lorakit inspect`: outputs, the PNG, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arith_helpers import CONFIGS, save_random_adapter  # noqa: E402

from lorakit.cli import main
from lorakit.io.factor_files import read_factors
from lorakit.ops import LayerFactors, diagnose

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def a(tiny_llama, tmp_path):
    return save_random_adapter(tiny_llama, tmp_path / "a", **CONFIGS["a"])


@pytest.fixture
def c(tiny_llama, tmp_path):
    return save_random_adapter(tiny_llama, tmp_path / "c", seed=1, **CONFIGS["c"])


def test_combine_writes_an_adapter_with_the_weighted_sum(a, c, tmp_path, capsys):
    out = tmp_path / "ac"
    assert main(["combine", str(a), str(c), "--weights", "0.7", "0.3", "--out", str(out)]) == 0
    assert "4 layers, r=8" in capsys.readouterr().out
    got, fa, fc = read_factors(out), read_factors(a), read_factors(c)
    for path, f in got.layers.items():
        torch.testing.assert_close(
            f.delta(), 0.7 * fa.layers[path].delta() + 0.3 * fc.layers[path].delta(), atol=1e-6, rtol=0
        )


def test_combine_ties_with_rank_and_density(a, c, tmp_path, capsys):
    out = tmp_path / "ties"
    args = ["combine", str(a), str(c), "--method", "ties", "--density", "0.5", "--rank", "2", "--out", str(out)]
    assert main(args) == 0
    assert read_factors(out).config.r == 2


def test_combine_refuses_to_overwrite_an_adapter_without_the_flag(a, c, capsys):
    assert main(["combine", str(a), str(c), "--out", str(c)]) == 1
    assert "already holds an adapter; pass --overwrite" in capsys.readouterr().err


def test_resize_prints_the_energy_kept_per_layer(a, tmp_path, capsys):
    assert main(["resize", str(a), "--rank", "2", "--out", str(tmp_path / "r2")]) == 0
    out = capsys.readouterr().out
    assert out.count("self_attn") == 4 and "energy kept min" in out
    assert main(["resize", str(a), "--rank", "6", "--out", str(tmp_path / "r6"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\nnote:")[0])
    assert all(r["padded"] and r["energy_kept"] == 1.0 for r in report["layers"].values())


def test_resize_to_rank_0_is_a_one_line_error(a, tmp_path, capsys):
    assert main(["resize", str(a), "--rank", "0", "--out", str(tmp_path / "r0")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: rank=0 must be a positive integer") and err.count("\n") == 1
    assert not (tmp_path / "r0").exists()


def test_inspect_prints_the_table_and_writes_a_valid_png(a, tmp_path, capsys):
    png = tmp_path / "spectra.png"
    assert main(["inspect", str(a), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "eff90" in out and "4 layers, r=4" in out
    assert png.read_bytes()[:8] == PNG_MAGIC


def _save_tiny_model_folder(model, path: Path) -> None:
    """The tiny model as an HF folder, with a word-level tokenizer (no download, no GGUF conversion)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", eos_token="</s>"
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_inspect_json_with_the_base_model_folder(a, tiny_llama, tmp_path, capsys):
    _save_tiny_model_folder(tiny_llama, tmp_path / "tiny")
    assert main(["inspect", str(a), "--json", "--model", str(tmp_path / "tiny")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 4 and all(layer["relative_norm"] > 0 for layer in report["layers"])
    assert report["verdict"] in ("low-rank", "moderate", "uses all of its rank")


def test_inspect_of_a_corrupt_adapter_is_a_one_line_error(a, capsys):
    (a / "adapter_model.safetensors").write_bytes(b"garbage")
    assert main(["inspect", str(a)]) == 1
    assert "not a valid safetensors file" in capsys.readouterr().err


def test_many_layers_are_drawn_as_a_heat_map(tmp_path):
    from lorakit.plots import spectra_png

    gen = torch.Generator().manual_seed(0)
    layers = {
        f"l{i}": LayerFactors(torch.randn(8, 16, generator=gen), torch.randn(16, 8, generator=gen), 1.0)
        for i in range(40)
    }
    png = spectra_png(diagnose(layers, source="many"), tmp_path / "heat.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
