"""llama.cpp side of `bench_decode.py`: the adapter as a GGUF LoRA, and timed completions through llama-cpp-python.

The LoRA GGUF is written here with the ``gguf`` package directly (until ``lorakit export --to gguf`` lands on main):
llama.cpp's names (``blk.N.attn_q.weight.lora_a`` / ``.lora_b``), ``adapter.lora.alpha``, and the rows of q/k
``B`` permuted as llama.cpp's converter permutes the base q/k weights (its rotary layout differs from HF's).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip


def _rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotary layout (halves) -> GGUF's (interleaved pairs), on the output rows of a q/k matrix."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_lora(adapter_dir: Path, config, out: Path) -> Path:
    """Convert a PEFT adapter folder (safetensors, fp32) of a Llama model into a llama.cpp LoRA GGUF."""
    import gguf
    from safetensors.torch import load_file

    import lorakit

    cfg = lorakit.LoraConfig.from_dict(__import__("json").loads((adapter_dir / "adapter_config.json").read_text()))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(cfg.lora_alpha))
    for key, t in sorted(tensors.items()):  # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
        parts = key.split(".")
        layer, proj, which = int(parts[parts.index("layers") + 1]), parts[-3], parts[-2]
        arr = t.float().numpy()
        if which == "lora_B" and proj in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if proj == "q_proj" else config.num_key_value_heads
            arr = _rope_rows(arr, heads)
        suffix = "lora_a" if which == "lora_A" else "lora_b"
        writer.add_tensor(f"blk.{layer}.{NAMES[proj]}.weight.{suffix}", np.ascontiguousarray(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


class LlamaCpp:
    """One llama.cpp model with one LoRA applied, greedy completions timed."""

    def __init__(self, model_path: str, lora_path: str | None, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=model_path, lora_path=lora_path, n_threads=threads, n_threads_batch=threads,
                         n_ctx=512, verbose=False)  # fmt: skip
        self.eos = self.llm.token_eos()

    def tokens_per_s(self, prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        """Greedy ``new_tokens`` (EOS suppressed, so every run makes the same count) after ``prompt_ids``."""
        self.llm.reset()
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


def no_eos_torch(eos: int):
    """A logits hook for lorakit/transformers runs that makes every run produce the same token count."""

    def hook(logits: torch.Tensor) -> torch.Tensor:
        logits[..., eos] = -float("inf")
        return logits

    return hook
