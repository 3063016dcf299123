"""Tiny model repositories as the Hub stores them (file name -> bytes), for `hub_server.FakeHub`.

``tiny_repo_files(model)`` saves any transformers model with ``save_pretrained`` and a small word-level
tokenizer (no download: built with the ``tokenizers`` library), and returns the files.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from torch import nn

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]


def tiny_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (ids < 64, so it fits any tiny model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative posix name -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_repo_files(model: nn.Module) -> dict[str, bytes]:
    """``model`` (``save_pretrained``, safetensors) plus `tiny_tokenizer`, as a repository's files."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        return folder_files(Path(tmp))
