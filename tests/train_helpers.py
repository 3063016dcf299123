"""Helpers for the training tests: a character-level tokenizer with a chat template, tiny models and data."""

from __future__ import annotations

import json
import string
from pathlib import Path

from tiny_models import tiny_llama

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_char_tokenizer():
    """One token per printable ASCII character plus ChatML specials (< 128 ids, fits the tiny Llama)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens(
        {"eos_token": "<|im_end|>", "pad_token": "<pad>", "additional_special_tokens": ["<|im_start|>"]}
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny_llama(seed: int = 0):
    return tiny_llama(seed, max_position_embeddings=256)


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def pc_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows of a learnable toy task: copy a short word in upper case."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdef") for _ in range(3))
        rows.append({"prompt": f"up {w}", "completion": w.upper()})
    return rows


# One run of the resume-equivalence test: dropout on (so RNG state matters), accumulation, several epochs.
RESUME_SETTINGS = dict(max_steps=14, save_steps=3, batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3,
                       lora_dropout=0.1, r=4, lora_alpha=8, seed=7, progress=False, precision="fp32",
                       eval_generate=False, target_modules="all-linear", logging_steps=1)  # fmt: skip
