"""What the decode benchmarks share (bench_decode.py on the CPU, bench_decode_cuda.py on a GPU): the four
adapters, chat prompts, timing and greedy agreement."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import lorakit

ADAPTERS = ["a0", "a1", "a2", "a3"]


def prepare_adapters(model, adapter: Path, folder: Path) -> bool:
    """Save a0 (the main job's adapter, or a random one) and three perturbed copies a1..a3; True if trained."""
    trained = (adapter / "adapter_config.json").is_file()
    if trained:
        lorakit.load_adapter(model, adapter, name="a0")
    else:
        lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj",
                            "v_proj", "o_proj"]), name="a0")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for i, name in enumerate(ADAPTERS):
        if name != "a0":
            lorakit.add_adapter(model, lorakit.get_config(model, "a0"), name=name)
        with torch.no_grad():
            src = lorakit.adapter_state_dict(model, "a0")
            for key, t in lorakit.adapter_state_dict(model, name).items():
                noise = torch.randn(t.shape, generator=gen) * 0.02 * (i > 0 or not trained)
                t.copy_(src[key.replace(f".{name}.", ".a0.")] + noise.to(t.device))
        lorakit.save_adapter(model, folder / name, name=name)
    for name in ADAPTERS:
        lorakit.delete_adapter(model, name)
    return trained


def chat_ids(tokenizer, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)


def timed(fn) -> tuple[float, object]:
    """Seconds ``fn`` takes (a GPU's queued work included, once CUDA is in use) and what it returned."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def agreement(outs: dict, ref: list[list[int]]) -> dict:
    """Per variant: share of rows identical to ``ref`` and the mean position of the first differing token."""
    out = {}
    for name, got in outs.items():
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(got, ref) if a != b]  # fmt: skip
        out[name] = {"identical": sum(a == b for a, b in zip(got, ref)) / len(ref),
                     "mean_first_difference": statistics.mean(first) if first else None}  # fmt: skip
    return out
