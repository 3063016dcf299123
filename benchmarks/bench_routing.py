"""Mixed-adapter batches: lorakit.route vs PEFT's adapter_names=, side by side on the default model (CPU).

- decode step: 32 rows, 1 new token each, a 64-token KV cache; base, one adapter, 32 different adapters (a
  step inside one generate call, and the first step of a new route, which stacks the adapters' factors);
- prefill: 8 rows x 128 tokens, 8 different adapters.
Adapters are r=16 on q,k,v,o with random (non-zero) B. Same inputs, alternating repetitions, median.
Outputs of lorakit's routed batch are checked against PEFT's before timing.

Run: python benchmarks/bench_routing.py [--reps 7] [--threads 1]
Writes benchmarks/results/routing.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

import lorakit
from lorakit import LoraConfig, routing
from lorakit.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _build(base, n_adapters: int):
    ours = copy.deepcopy(base)
    theirs = None
    gen = torch.Generator().manual_seed(0)
    for i in range(n_adapters):
        name = f"a{i}"
        lorakit.add_adapter(ours, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), name=name)
        cfg = PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
        if theirs is None:
            theirs = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            theirs.add_adapter(name, cfg)
        with torch.no_grad():
            for path, layer in lorakit.layers.iter_lora_layers(ours):
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
                peft_layer = theirs.base_model.model.get_submodule(path)
                peft_layer.lora_A[name].weight.copy_(a)
                peft_layer.lora_B[name].weight.copy_(b)
    return ours.eval(), theirs.eval()


def _median(fns: dict, reps: int, setup=None) -> dict[str, float]:
    times = {k: [] for k in fns}
    for rep in range(reps + 1):  # the first round is a warm-up
        for k, fn in fns.items():
            arg = setup() if setup else None
            start = time.perf_counter()
            fn(arg)
            if rep:
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def decode(base, ours, theirs, reps: int) -> dict:
    rows = 32
    names = [f"a{i}" for i in range(rows)]
    prompt = torch.randint(0, base.config.vocab_size, (rows, 64), generator=torch.Generator().manual_seed(1))
    step = torch.randint(0, base.config.vocab_size, (rows, 1), generator=torch.Generator().manual_seed(2))
    cache = base(prompt, use_cache=True).past_key_values  # the base cache is fine: timing, not values

    with lorakit.route(ours, names):
        mixed = ours(step, past_key_values=copy.deepcopy(cache)).logits
    ref = theirs(input_ids=step, past_key_values=copy.deepcopy(cache), adapter_names=names).logits
    torch.testing.assert_close(mixed, ref, atol=1e-4, rtol=0)

    lorakit.set_adapter(ours, "a0")
    theirs.set_adapter("a0")

    with lorakit.route(ours, names):  # validates the names; the Route object is then reused like generate() does
        route = routing.current_route()

    def routed(c):  # a decode step inside one generate(): the per-layer stacks are built on the first step only
        with routing.activate(route):
            ours(step, past_key_values=c)

    def routed_first(c):  # the first step of a new route: builds the stacks
        with lorakit.route(ours, names):
            ours(step, past_key_values=c)

    return _median(
        {
            "base": lambda c: base(step, past_key_values=c),
            "lorakit_one": lambda c: ours(step, past_key_values=c),
            "peft_one": lambda c: theirs(input_ids=step, past_key_values=c),
            "lorakit_mixed": routed,
            "lorakit_mixed_first_step": routed_first,
            "peft_mixed": lambda c: theirs(input_ids=step, past_key_values=c, adapter_names=names),
        },
        reps,
        setup=lambda: copy.deepcopy(cache),
    )


@torch.no_grad()
def prefill(base, ours, theirs, reps: int) -> dict:
    names = [f"a{i}" for i in range(8)]
    ids = torch.randint(0, base.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(3))

    def routed(_):
        with lorakit.route(ours, names):
            ours(ids)

    return _median(
        {
            "base": lambda _: base(ids),
            "lorakit_mixed": routed,
            "peft_mixed": lambda _: theirs(input_ids=ids, adapter_names=names),
        },
        reps,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "routing.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_model("smollm2-135m-instruct")
    ours, theirs = _build(base, 32)
    results = {"threads": args.threads, "reps": args.reps}
    results["decode_s"] = decode(base, ours, theirs, args.reps)
    results["prefill_s"] = prefill(base, ours, theirs, args.reps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    d, p = r["decode_s"], r["prefill_s"]
    return "\n".join(
        [
            "| mixed-adapter batch (SmolLM2-135M, CPU fp32, r=16 q,k,v,o) | lorakit | PEFT |",
            "|---|---|---|",
            f"| decode step, 32 rows, one adapter, x base | {d['lorakit_one'] / d['base']:.2f}x "
            f"| {d['peft_one'] / d['base']:.2f}x |",
            f"| decode step, 32 rows, 32 different adapters, x base | {d['lorakit_mixed'] / d['base']:.2f}x "
            f"| {d['peft_mixed'] / d['base']:.2f}x |",
            f"| same, lorakit speed-up over PEFT | {d['peft_mixed'] / d['lorakit_mixed']:.2f}x | 1.00x |",
            f"| same, first step of a new route (builds the stacks), x base "
            f"| {d['lorakit_mixed_first_step'] / d['base']:.2f}x | - |",
            f"| prefill 8 x 128, 8 different adapters, x base | {p['lorakit_mixed'] / p['base']:.2f}x "
            f"| {p['peft_mixed'] / p['base']:.2f}x |",
        ]
    )


if __name__ == "__main__":
    main()
