"""Greedy decoding with lorakit and with llama.cpp (through ``llama-cpp-python``) on the same token ids.

Used by the tests and by ``benchmarks/check_gguf_export.py`` to show that an exported GGUF (adapter or merged
model) reproduces what lorakit generates. Both sides get identical prompt token ids (rendered and tokenized
once, by the Hugging Face tokenizer), so only the model arithmetic can make them differ.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def llama_cpp_module() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError(
            f"Running a GGUF file needs llama-cpp-python ({exc}): pip install 'lorakit[llamacpp]'"
        ) from exc
    return llama_cpp


@torch.no_grad()
def lorakit_greedy(
    model: torch.nn.Module, prompts: Sequence[list[int]], max_new: int, stops: set[int]
) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, stop token excluded), one prompt at a time, no padding."""
    out = []
    for ids in prompts:
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stops),
            pad_token_id=min(stops), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids):].tolist()  # fmt: skip
        out.append(_until_stop(gen, stops))
    return out


def llama_cpp_greedy(
    model_path: str | os.PathLike[str],
    prompts: Sequence[list[int]],
    max_new: int,
    stops: set[int],
    lora_path: str | os.PathLike[str] | None = None,
    threads: int = 1,
) -> list[list[int]]:
    """The same with llama.cpp: argmax of the logits after each token (no sampler involved)."""
    llama_cpp = llama_cpp_module()
    kwargs = {"lora_path": str(lora_path)} if lora_path is not None else {}
    n_ctx = max(len(p) for p in prompts) + max_new + 8
    # logits_all: llama-cpp-python >= 0.3 keeps no logits in `scores` otherwise (sampling moved into llama.cpp)
    llm = llama_cpp.Llama(
        str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False,
        **kwargs,
    )  # fmt: skip
    out = []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            gen: list[int] = []
            while len(gen) < max_new:
                token = int(llm.scores[llm.n_tokens - 1].argmax())
                if token in stops:
                    break
                gen.append(token)
                llm.eval([token])
            out.append(gen)
    finally:
        if hasattr(llm, "close"):  # llama-cpp-python >= 0.2.80 frees the model here, not at garbage collection
            llm.close()
    return out


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i]
    return tokens


@dataclass(frozen=True)
class Agreement:
    """How many rows two decodings share exactly."""

    rows: int
    identical: int

    @property
    def fraction(self) -> float:
        return self.identical / self.rows if self.rows else 0.0


def agreement(a: Sequence[list[int]], b: Sequence[list[int]]) -> Agreement:
    """Rows whose generated token ids are identical."""
    return Agreement(len(a), sum(x == y for x, y in zip(a, b)))
