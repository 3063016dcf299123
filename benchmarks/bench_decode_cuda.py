"""Fast decode on a GPU: lorakit's engine (eager, CUDA graphs, bf16 base) vs PEFT + ``generate``, side by side.

The model is the embedded SmolLM2-135M-Instruct with the main job's adapter (``--adapter``; a random r=16 q,k,v,o
adapter when it is missing, said in the results) and three perturbed copies, as in bench_decode.py. In each
round every variant runs in turn (alternating):

- single stream: one held-out prompt of the main job (chat template), adapter a0 unmerged, exactly ``--tokens``
  new tokens (greedy, no early stop);
- 16 requests over 4 adapters: the next 16 held-out prompts, adapters a0..a3 in turn, ``--tokens`` each. PEFT
  runs them as one left-padded batch with ``adapter_names=`` (its mixed-adapter batch); lorakit's engine as rows
  of its batch (`lorakit.inference.generate.run_engine`, what ``lorakit serve`` runs per step).

Every variant runs once untimed first (graph capture, cuBLAS handles). The table gives the median and the range
of tokens/s over all rounds, and each technique's ratio (graphs vs eager, bf16 vs fp32, lorakit vs PEFT).
Exactness, once: the 16 requests decoded greedily to EOS (64 tokens at most) by eager fp32, by fp32 with CUDA
graphs, by bf16 with graphs, and by PEFT one prompt at a time: share of rows identical to eager fp32.

Run: python benchmarks/bench_decode_cuda.py [--rounds 5] [--tokens 64]
Writes benchmarks/results/decode_cuda.json (machine, GPU, date, every sample) and prints a Markdown table.
``--device cpu --rounds 1`` is a smoke run of the script (no graphs on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from decode_common import ADAPTERS, agreement, prepare_adapters, timed  # benchmarks/ is on sys.path
from provenance import finish, provenance, spread, write_results

import lorakit
from lorakit.inference import DecodeEngine
from lorakit.inference.generate import run_engine
from lorakit.models import default_model_name, load_model

ROOT = Path(__file__).resolve().parents[1]
PEFT_SINGLE, PEFT_BATCH = "PEFT + generate (unmerged)", "PEFT + generate, one batch (adapter_names)"


def engines(model, device: str, width: int) -> dict[str, tuple[DecodeEngine, DecodeEngine]]:
    """Per variant, an engine of one row (single stream) and one of 16 rows (the mixed requests)."""
    graphs = {"fp32 + CUDA graphs": ("fp32", True), "bf16 + CUDA graphs": ("bf16", True)} if device == "cuda" else {}
    variants = {"fp32 eager": ("fp32", False), **graphs, "bf16 eager": ("bf16", False)}
    return {name: tuple(DecodeEngine(model, weights=fmt, max_batch=b, max_len=width, cuda_graphs=graphs)
                        for b in (1, 16)) for name, (fmt, graphs) in variants.items()}  # fmt: skip


def peft_generate(peft_model, prompts: list[list[int]], names: list[str], tokens: int | None, pad: int, stops):
    """Greedy PEFT generate of ``prompts`` as one left-padded batch; exactly ``tokens`` new tokens, or up to 64
    stopping at ``stops`` (``tokens=None``). Returns the new tokens per row (stop tokens and padding dropped)."""
    device = next(peft_model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    if tokens:  # EOS suppressed until ``tokens`` (what ignore_eos does)
        kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens)
    else:
        kwargs = dict(max_new_tokens=64, eos_token_id=sorted(stops))
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, do_sample=False,
                                  pad_token_id=pad, **kwargs)  # fmt: skip
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row)) if not tokens else len(row)
        rows.append(row[:cut])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--adapter", default=str(ROOT / "runs/orders"), help="the main job's output folder")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_cuda.json"))
    args = parser.parse_args()
    if 16 * args.rounds + 1 > 100:
        parser.error(f"--rounds {args.rounds}: each round takes 17 distinct held-out prompts of 100 (at most 5)")
    from peft import PeftModel

    from lorakit.training.evaluate import prompt_text, stop_token_ids
    from lorakit.training.jsonl import read_jsonl

    prov = provenance()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    model, tokenizer = load_model(default_model_name(), device=args.device)
    peft_base = copy.deepcopy(model)
    rows = read_jsonl(ROOT / "examples/data/orders_eval.jsonl")
    prompts = [tokenizer(prompt_text(r, tokenizer, True)[0], add_special_tokens=False)["input_ids"] for r in rows]
    stops, pad = set(stop_token_ids(tokenizer)), tokenizer.pad_token_id or 0
    width = max(map(len, prompts)) + max(args.tokens, 64) + 2  # the agreement check decodes up to 64 tokens
    results = {"model": default_model_name(), "device": args.device, "tokens": args.tokens, "greedy": True,
               "provenance": prov}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results["adapter_trained"] = prepare_adapters(model, Path(args.adapter), folder)
        peft_model = PeftModel.from_pretrained(peft_base, folder / "a0", adapter_name="a0").eval()
        for name in ADAPTERS[1:]:
            peft_model.load_adapter(folder / name, adapter_name=name)
        for name in ADAPTERS:
            lorakit.load_adapter(model, folder / name, name=name)
        runs = engines(model, args.device, width)
        names16 = [ADAPTERS[i % 4] for i in range(16)]

        def round_of(r: int) -> dict[str, float]:
            one, many = prompts[17 * r], prompts[17 * r + 1 : 17 * r + 17]
            n = args.tokens
            out = {f"single stream: {PEFT_SINGLE}": n / timed(lambda: peft_generate(
                peft_model, [one], ["a0"], n, pad, stops))[0]}  # fmt: skip
            for name, (e1, _) in runs.items():
                out[f"single stream: lorakit {name}"] = (
                    n / timed(lambda e=e1: run_engine(e, [one], ["a0"], n, set()))[0]
                )
            out[f"16 requests: {PEFT_BATCH}"] = 16 * n / timed(lambda: peft_generate(
                peft_model, many, names16, n, pad, stops))[0]  # fmt: skip
            for name, (_, e16) in runs.items():
                out[f"16 requests: lorakit {name}"] = (
                    16 * n / timed(lambda e=e16: run_engine(e, many, names16, n, set()))[0]
                )
            return out

        round_of(args.rounds - 1)  # untimed: captures, handles, caches
        samples = []
        for r in range(args.rounds):
            samples.append(round_of(r))
            print(f"round {r}: " + ", ".join(f"{k} {v:.0f}" for k, v in samples[-1].items()), flush=True)
        results["tokens_per_s"] = {k: spread([s[k] for s in samples]) for k in samples[0]}
        results["ratios"] = ratios(samples, list(runs))
        check = prompts[:16]
        outs = {name: run_engine(e16, check, names16, 64, stops) for name, (_, e16) in runs.items()}
        outs[PEFT_SINGLE + ", one prompt at a time"] = [
            peft_generate(peft_model, [p], [a], None, pad, stops)[0] for p, a in zip(check, names16)
        ]
        results["greedy_agreement_with_eager_fp32"] = agreement(outs, outs["fp32 eager"])
        results["graph_captures"] = {name: e16.graphs.captures for name, (_, e16) in runs.items() if e16.graphs}
    finish(prov)
    write_results(Path(args.out), results)
    print(table(results))


def ratios(samples: list[dict], variants: list[str]) -> dict:
    """Per-round ratios (median and range): each lorakit variant vs PEFT, graphs vs eager, bf16 vs fp32."""
    pairs = {}
    for part, peft in (("single stream", PEFT_SINGLE), ("16 requests", PEFT_BATCH)):
        for v in variants:
            pairs[f"{part}: lorakit {v} / PEFT"] = (f"{part}: lorakit {v}", f"{part}: {peft}")
        for a, b in (("fp32 + CUDA graphs", "fp32 eager"), ("bf16 + CUDA graphs", "bf16 eager"),
                     ("bf16 + CUDA graphs", "fp32 + CUDA graphs"), ("bf16 eager", "fp32 eager")):  # fmt: skip
            if a in variants and b in variants:
                pairs[f"{part}: {a} / {b}"] = (f"{part}: lorakit {a}", f"{part}: lorakit {b}")
    return {k: spread([s[a] / s[b] for s in samples]) for k, (a, b) in pairs.items()}


def table(r: dict) -> str:
    lines = ["| variant | tokens/s median | range |", "|---|---|---|"]
    for name, s in r["tokens_per_s"].items():
        lines.append(f"| {name} | {s['median']:.0f} | {s['min']:.0f}-{s['max']:.0f} |")
    lines += ["", "| ratio | median | range |", "|---|---|---|"]
    for name, s in r["ratios"].items():
        lines.append(f"| {name} | {s['median']:.2f}x | {s['min']:.2f}-{s['max']:.2f} |")
    lines += ["", "| greedy to EOS, 16 rows | identical to eager fp32 |", "|---|---|"]
    for name, a in r["greedy_agreement_with_eager_fp32"].items():
        lines.append(f"| {name} | {a['identical']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
