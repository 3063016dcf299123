"""lorakit.model_cache with a cheap converter (a tiny model): atomic builds, races, failed conversions.

The real GGUF conversion is exercised in test_models.py; here the converter is a stand-in so that the
cache's own guarantees can be checked in milliseconds.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lorakit import model_cache


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(1000))
    return path


@pytest.fixture
def convert(tiny_llama, default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    calls = []

    def fake_convert(path: Path):
        calls.append(path)
        return tiny_llama, tokenizer

    fake_convert.calls = calls
    return fake_convert


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_build_writes_a_valid_marked_folder_once(source, convert, tmp_path):
    target = tmp_path / "models" / "m"
    assert model_cache.build_if_needed(source, target, convert, quiet=True)
    assert not model_cache.build_if_needed(source, target, convert, quiet=True)
    assert len(convert.calls) == 1 and model_cache.cache_problem(target, source) is None
    assert {"config.json", "model.safetensors", "tokenizer.json", model_cache.MARKER} <= {
        p.name for p in target.iterdir()
    }
    assert leftovers(target.parent) == []


def test_racing_builders_convert_once_and_never_expose_a_partial_folder(source, convert, tmp_path):
    target = tmp_path / "models" / "m"
    errors = []

    def build():
        try:
            model_cache.build_if_needed(source, target, convert, quiet=True)
            assert model_cache.cache_problem(target, source) is None
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(convert.calls) == 1
    assert leftovers(target.parent) == []


def test_failed_conversion_leaves_no_folder_behind(source, tmp_path):
    target = tmp_path / "models" / "m"

    def broken(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        model_cache.build_if_needed(source, target, broken, quiet=True)
    assert not target.exists() and leftovers(target.parent) == []


def test_changed_source_rebuilds_in_place(source, convert, tmp_path, capfd):
    target = tmp_path / "models" / "m"
    model_cache.build_if_needed(source, target, convert, quiet=True)
    source.write_bytes(b"GGUF" + bytes(2000))  # another file under the same name
    assert "another GGUF file" in model_cache.cache_problem(target, source)
    assert model_cache.build_if_needed(source, target, convert)
    assert len(convert.calls) == 2 and model_cache.cache_problem(target, source) is None
    assert "unusable: it was built from another GGUF file" in capfd.readouterr().err
    assert leftovers(target.parent) == []
