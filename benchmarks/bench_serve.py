"""Serving throughput on the default model: mixed-adapter continuous batching vs one-at-a-time vs PEFT.

Workload (fixed): 16 completion requests over 4 adapters (r=16 on q,k,v,o, random non-zero B), 16 new tokens
each, greedy, short prompts of different lengths. Three ways to serve it:
- ``lorakit_batched``: a real `lorakit serve` on loopback (``--max-batch-size 16``), 16 concurrent HTTP clients;
- ``lorakit_one_at_a_time``: the same server with ``--max-batch-size 1`` (requests queue and run alone);
- ``peft_adapter_names``: PEFT in process (no HTTP), all 16 rows left-padded into one ``generate`` call with
  ``adapter_names=`` (PEFT's mixed-batch inference: a loop over adapters inside each LoRA layer).
Answers of the three are compared (greedy: they should agree). Median of ``--reps`` runs after a warm-up.

Run: python benchmarks/bench_serve.py [--reps 3] [--threads 1]
Writes benchmarks/results/serve.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from peft import PeftModel

import lorakit
from lorakit import LoraConfig
from lorakit.layers import iter_lora_layers
from lorakit.models import default_model_name, ensure_cached, load_model
from lorakit.serve.server import build_state, serve_in_thread

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = [f"a{i}" for i in range(4)]
PROMPTS = ["Write a haiku about the sea.", "The three laws of motion are", "def quicksort(xs):",
           "Translate to French: good morning, my friend.", "Once upon a time, in a small village,",
           "The capital of Japan is", "List three colors:", "A good breakfast includes"]  # fmt: skip
N_REQUESTS, NEW_TOKENS = 16, 16


def _save_adapters(folder: Path) -> None:
    model, _ = load_model(default_model_name())
    gen = torch.Generator().manual_seed(0)
    for name in ADAPTERS:
        lorakit.add_adapter(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), name=name)
        with torch.no_grad():
            for _, layer in iter_lora_layers(model):
                b = layer.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
        lorakit.save_adapter(model, folder / name, name=name)


def _jobs() -> list[tuple[str, str]]:
    return [(ADAPTERS[i % len(ADAPTERS)], PROMPTS[i % len(PROMPTS)]) for i in range(N_REQUESTS)]


async def _send_all(url: str) -> list[str]:
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(adapter, prompt):
            body = {"model": adapter, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
            r = await client.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(a, p) for a, p in _jobs()))


def bench_server(adapters: Path, max_batch_size: int, reps: int) -> tuple[list[float], list[str]]:
    model, tokenizer = load_model(default_model_name())
    state = build_state(model, tokenizer, base_name=default_model_name(), adapters_dir=adapters,
                        max_batch_size=max_batch_size)  # fmt: skip
    times = []
    with serve_in_thread(state) as url:
        texts = asyncio.run(_send_all(url))  # warm-up: loads the adapters
        for _ in range(reps):
            start = time.perf_counter()
            texts = asyncio.run(_send_all(url))
            times.append(time.perf_counter() - start)
    return times, texts


def bench_peft(adapters: Path, reps: int) -> tuple[list[float], list[str]]:
    base, tokenizer = load_model(default_model_name())
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapters / ADAPTERS[0], adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    model.eval()
    tokenizer.padding_side = "left"
    jobs = _jobs()
    batch = tokenizer([p for _, p in jobs], return_tensors="pt", padding=True)
    names = [a for a, _ in jobs]
    times, out = [], None
    for rep in range(reps + 1):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, adapter_names=names, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        if rep:
            times.append(time.perf_counter() - start)
    width = batch.input_ids.shape[1]
    return times, [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ensure_cached(default_model_name())
    with tempfile.TemporaryDirectory() as tmp:
        adapters = Path(tmp)
        _save_adapters(adapters)
        runs = {
            "lorakit_batched": bench_server(adapters, N_REQUESTS, args.reps),
            "lorakit_one_at_a_time": bench_server(adapters, 1, args.reps),
            "peft_adapter_names": bench_peft(adapters, args.reps),
        }
    tokens = N_REQUESTS * NEW_TOKENS
    reference = runs["lorakit_one_at_a_time"][1]
    results = {
        "model": default_model_name(),
        "threads": args.threads,
        "reps": args.reps,
        "workload": {
            "requests": N_REQUESTS,
            "adapters": len(ADAPTERS),
            "new_tokens": NEW_TOKENS,
            "rank": 16,
            "targets": TARGETS,
            "greedy": True,
        },  # fmt: skip
        "seconds": {k: statistics.median(t) for k, (t, _) in runs.items()},
        "tokens_per_s": {k: tokens / statistics.median(t) for k, (t, _) in runs.items()},
        "answers_equal_one_at_a_time": {
            k: sum(a == b for a, b in zip(texts, reference, strict=True)) for k, (_, texts) in runs.items()
        },  # fmt: skip
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    base = r["tokens_per_s"]["lorakit_one_at_a_time"]
    rows = [f"Serving {r['workload']['requests']} requests x {r['workload']['new_tokens']} tokens over "
            f"{r['workload']['adapters']} adapters, {r['model']}, {r['threads']} CPU thread(s), median of {r['reps']}",
            "", "| mode | seconds | tokens/s | vs one-at-a-time | answers equal to one-at-a-time |",
            "|---|---:|---:|---:|---:|"]  # fmt: skip
    for k, s in r["seconds"].items():
        tps = r["tokens_per_s"][k]
        rows.append(f"| {k} | {s:.2f} | {tps:.1f} | {tps / base:.2f}x | "
                    f"{r['answers_equal_one_at_a_time'][k]}/{r['workload']['requests']} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
