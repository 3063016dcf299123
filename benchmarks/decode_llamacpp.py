"""llama.cpp side of `bench_decode.py`: timed greedy completions through llama-cpp-python with a GGUF LoRA."""

from __future__ import annotations

import time

import numpy as np


class LlamaCpp:
    """One llama.cpp model with one LoRA applied, greedy completions timed."""

    def __init__(self, model_path: str, lora_path: str | None, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=model_path, lora_path=lora_path, n_threads=threads, n_threads_batch=threads,
                         n_ctx=512, verbose=False)  # fmt: skip
        self.eos = self.llm.token_eos()

    def tokens_per_s(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        """Greedy ``new_tokens`` (EOS suppressed, so every run makes the same count) after ``prompt_ids``.

        llama-cpp-python keeps the previous call's keys/values and reuses their longest common start with
        ``prompt_ids`` (as llama.cpp's server does with its prompt cache): the counterpart of lorakit's prefix cache.
        """
        out: list[int] = []
        start = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True,
                                     logits_processor=[self._no_eos]):  # fmt: skip
            out.append(tok)
            if len(out) >= new_tokens:
                break
        return len(out) / (time.perf_counter() - start), out

    def _no_eos(self, _ids, scores):
        scores[self.eos] = -np.inf
        return scores


def solo_ids(tokenizer, text: str) -> list[int]:
    """Prompt ids as both sides see them (chat template applied, no extra BOS)."""
    msgs = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
