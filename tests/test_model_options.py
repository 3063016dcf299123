"""load_model's dtype and device options (CPU here; "auto" means fp32 on the CPU, the checkpoint's dtype on CUDA)."""

from __future__ import annotations

import json

import pytest
import torch
from hub_repo import tiny_tokenizer
from tiny_models import tiny_llama

from lorakit.errors import ConfigError
from lorakit.model_placement import pick_dtype
from lorakit.models import load_model


@pytest.fixture
def folder(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def test_auto_dtype_and_device_on_a_cpu_are_fp32_on_the_cpu(folder):
    model, _ = load_model(folder, dtype="auto", device="auto" if not torch.cuda.is_available() else "cpu")
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    ("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_explicit_dtype(folder, name, dtype):
    model, _ = load_model(folder, dtype=name, device="cpu")
    assert next(model.parameters()).dtype == dtype


def test_auto_dtype_on_cuda_is_the_checkpoints(folder):
    saved = json.loads((folder / "config.json").read_text())
    assert (saved.get("dtype") or saved.get("torch_dtype")) == "bfloat16"
    assert pick_dtype("auto", folder, torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("auto", folder, "auto-map") == torch.bfloat16
    assert pick_dtype("auto", folder, torch.device("cpu")) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_the_fix(folder):
    with pytest.raises(ConfigError, match="CUDA is not available here; use device='cpu' or 'auto'"):
        load_model(folder, device="cuda")


def test_a_bad_device_names_the_choices(folder):
    with pytest.raises(ConfigError, match="use 'auto', 'cpu' or 'cuda"):
        load_model(folder, device="tpu-ish")
