"""Packing vs padding on variable-length data: tokens/s, padding waste and the loss curve.

Data: text rows whose token lengths are log-uniform between 20 and ``--max-length`` (as in SFT data: many short
rows, a long tail), tokenized with the embedded model's tokenizer; every token is learned. Three ways to batch
the same examples for one epoch, from the same adapter initialisation, each a full training step (forward,
backward, AdamW) through lorakit's own collation and loss:

- ``padded``: random batches of ``--batch`` examples, right-padded to the longest (``--no-group-by-length``);
- ``grouped``: ``--group-by-length`` batches (similar lengths together, then padded);
- ``packed``: ``--packing``, rows of ``max_length`` tokens, ``--packed-batch`` rows per step (default: the
  padded batch's real tokens on average), attention confined to each example.

Modes alternate within each repetition (the order rotates), and tokens/s (real, non-padding tokens per second
of training) is reported as the median and range over repetitions, with each mode's ratio to ``padded``. The
loss curve is the train loss against real tokens seen; the eval loss after the epoch is on held-out rows,
unpacked, for all three.

Models: ``--model tiny-llama`` (the default) is a randomly initialised 6-layer Llama (hidden 256, 4 heads,
character vocabulary of 128: the decoder dominates the cost, as in a real LLM); the data is character ids. Any
name ``lorakit.load_model`` takes (``smollm2-135m-instruct``) runs on that model and its tokenizer instead (on a
shared 2-core box that takes far longer than a few minutes).

Run: python benchmarks/bench_packing.py [--reps 3] [--examples 64] [--max-length 256] [--model tiny-llama]
Writes benchmarks/results/packing.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.state import adapter_state_dict, load_adapter_state_dict
from lorakit.training.collate import batch_order, collate
from lorakit.training.data import Example
from lorakit.training.evaluate import eval_loss
from lorakit.training.loss import causal_lm_loss
from lorakit.training.packing import collate_packed, pack, padding_waste

MODES = ("padded", "grouped", "packed")
WORDS = "zero one two three four five six seven eight nine".split()


def make_examples(tokenizer, n: int, max_length: int, seed: int) -> list[Example]:
    """Counting sentences cut to log-uniform token lengths in [20, max_length] (``tokenizer`` None: characters)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = int(round(math.exp(rng.uniform(math.log(20), math.log(max_length)))))
        start = rng.randrange(1000)
        text = "Counting: " + ", ".join(" ".join(WORDS[int(d)] for d in str(k)) for k in range(start, start + 400))
        ids = (tokenizer(text)["input_ids"] if tokenizer else [ord(c) % 128 for c in text])[:length]
        out.append(Example(ids, list(ids), f"row{i}"))
    return out


def batches(mode: str, examples: list[Example], batch: int, packed_batch: int, max_length: int, seed: int):
    """The epoch's batches of ``mode`` as lists of rows (examples or packed rows)."""
    if mode == "packed":
        rows = pack(examples, max_length)
        order = batch_order([len(r) for r in rows], packed_batch, seed, 0, group_by_length=False)
        return [[rows[i] for i in idx] for idx in order]
    order = batch_order([len(e) for e in examples], batch, seed, 0, group_by_length=mode == "grouped")
    return [[examples[i] for i in idx] for idx in order]


def run_epoch(model, mode: str, plan, pad_id: int, init: dict, lr: float) -> dict:
    load_adapter_state_dict(model, init, "default")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    curve, tokens, seconds = [], 0, 0.0
    for rows in plan:
        batch = collate_packed(rows, pad_id) if mode == "packed" else collate(rows, pad_id)
        n_learned = int((batch["labels"][:, 1:] != -100).sum())
        t0 = time.perf_counter()
        loss = causal_lm_loss(model, batch, reduction="sum") / n_learned
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        tokens += sum(len(r) for r in rows)
        curve.append((tokens, round(float(loss.detach()), 4)))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "curve": curve}


def load(name: str):
    """``(model, tokenizer)``; ``tiny-llama`` has no tokenizer (character ids)."""
    if name != "tiny-llama":
        return lorakit.load_model(name)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=4096)  # fmt: skip
    return LlamaForCausalLM(config), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--packed-batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load(a.model)
    torch.manual_seed(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"]))  # fmt: skip
    init = {k: v.detach().clone() for k, v in adapter_state_dict(model, "default").items()}
    pad_id = 0 if tok is None else tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = make_examples(tok, a.examples + a.eval_examples, a.max_length, seed=0)
    train, held = examples[: a.examples], examples[a.examples :]
    mean_len = statistics.mean(len(e) for e in train)
    packed_batch = a.packed_batch or max(1, round(a.batch * mean_len / a.max_length))
    plans = {m: batches(m, train, a.batch, packed_batch, a.max_length, seed=0) for m in MODES}
    waste = {m: padding_waste([len(e) for e in train], [[len(r) for r in rows] for rows in plans[m]]) for m in MODES}
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for m in MODES:  # warm-up (allocator, first-call overheads), not timed
        run_epoch(model, m, plans[m][:1], pad_id, init, a.lr)
    for rep in range(a.reps):
        for m in MODES[rep % 3 :] + MODES[: rep % 3]:
            r = run_epoch(model, m, plans[m], pad_id, init, a.lr)
            model.eval()
            r["eval_loss"] = eval_loss(model, held, pad_id, 8)
            runs[m].append(r)
            print(f"rep {rep} {m:8s} {r['tokens_per_s']:7.1f} tok/s  eval loss {r['eval_loss']:.4f}", flush=True)
    report(a, runs, waste, plans, packed_batch, mean_len)


def report(a, runs, waste, plans, packed_batch, mean_len) -> None:
    base = [r["tokens_per_s"] for r in runs["padded"]]
    summary = {}
    for m, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        ratios = [t / b for t, b in zip(tps, base)]
        summary[m] = {"tokens_per_s_median": round(statistics.median(tps), 1),
                      "tokens_per_s_range": [round(min(tps), 1), round(max(tps), 1)],
                      "ratio_vs_padded_median": round(statistics.median(ratios), 3),
                      "ratio_vs_padded_range": [round(min(ratios), 3), round(max(ratios), 3)],
                      "padding_waste": round(waste[m], 4), "steps_per_epoch": len(plans[m]),
                      "eval_loss_after_epoch": [round(r["eval_loss"], 4) for r in rs],
                      "loss_curve_rep0": rs[0]["curve"]}  # fmt: skip
    out = {"benchmark": "bench_packing", "date": datetime.date.today().isoformat(),
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "torch": torch.__version__, "threads": a.threads,
                       "note": "shared 2-core box (other jobs running): compare ratios, not absolute tokens/s"},
           "model": a.model, "examples": a.examples, "mean_length": round(mean_len, 1), "max_length": a.max_length,
           "batch": a.batch, "packed_batch": packed_batch, "reps": a.reps, "lr": a.lr, "results": summary}  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(a.out)
    print(f"\n{a.examples} examples, lengths 20..{a.max_length} (mean {mean_len:.0f}), {a.reps} reps, "
          f"{a.threads} thread(s), {a.model}\n")  # fmt: skip
    print("| batching | padding waste | steps/epoch | tokens/s (median, range) | vs padded | eval loss after 1 epoch |")
    print("|---|---|---|---|---|---|")
    for m, s in summary.items():
        lo, hi = s["tokens_per_s_range"]
        rlo, rhi = s["ratio_vs_padded_range"]
        print(f"| {m} | {100 * s['padding_waste']:.1f}% | {s['steps_per_epoch']} | {s['tokens_per_s_median']:.0f} "
              f"({lo:.0f}-{hi:.0f}) | {s['ratio_vs_padded_median']:.2f}x ({rlo:.2f}-{rhi:.2f}) | "
              f"{statistics.median(s['eval_loss_after_epoch']):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
