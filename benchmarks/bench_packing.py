"""Packing vs padding on variable-length data, on the embedded SmolLM2-135M-Instruct: tokens/s, padding waste, loss.

Data: text rows whose token lengths are log-uniform between 20 and ``--max-length`` (as in SFT data: many short
rows, a long tail), tokenized with the model's own tokenizer; every token is learned. Two ways to batch the same
examples, each trained from the same adapter initialisation with its own AdamW, every step a full training step
(forward, backward, AdamW) through lorakit's own collation and loss:

- ``padded``: random batches of ``--batch`` examples, right-padded to the longest (``--no-group-by-length``);
- ``packed``: ``--packing``, rows of ``max_length`` tokens, ``--packed-batch`` rows per step (default: the
  padded batch's real tokens on average), attention confined to each example;
- (``grouped``, ``--group-by-length`` then padded, with ``--modes padded,grouped,packed``.)

Kept short for a shared CPU box: ``--rounds`` rounds; in each, every mode (the order rotates) runs ``--steps``
steps, continuing its own run (adapter and optimizer state carried over). Tokens/s (real, non-padding tokens per
second of training) is reported per round as the median and range, with the ratio to ``padded`` of the same round.
The loss curve is each mode's train loss against real tokens seen; at the end each mode's adapter is scored on
held-out rows (eval loss, unpacked). Before training, one batch of examples is run padded and packed through the
model: the two losses must agree (fp32), which is what makes the curves comparable.

Models: ``--model smollm2-135m-instruct`` (the default; ``lorakit.load_model``, the embedded GGUF converted once and
cached) or ``--model tiny-llama``, a randomly initialised 6-layer Llama over character ids (seconds, not minutes).

Run: OMP_NUM_THREADS=2 python benchmarks/bench_packing.py --threads 2
Writes benchmarks/results/packing.json (with provenance: machine, load averages, date, commit, command) and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
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

sys.path.insert(0, str(Path(__file__).parent))
from provenance import finish, provenance, spread, write_results  # noqa: E402

WORDS = "zero one two three four five six seven eight nine".split()
NOTE = (
    "shared 2-core box: the lead's benchmarks and other helpers' tests ran at the same time (load averages in "
    "provenance); modes alternate within each round, so compare the per-round ratios, not absolute tokens/s"
)


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
        order = batch_order(rows.lengths, packed_batch, seed, 0, group_by_length=False)
        return [[rows[i] for i in idx] for idx in order]
    order = batch_order([len(e) for e in examples], batch, seed, 0, group_by_length=mode == "grouped")
    return [[examples[i] for i in idx] for idx in order]


def to_batch(mode: str, rows, pad_id: int) -> dict[str, torch.Tensor]:
    return collate_packed(rows, pad_id) if mode == "packed" else collate(rows, pad_id)


class Run:
    """One mode's training run, resumable across rounds: its adapter, optimizer, plan position and curve."""

    def __init__(self, mode: str, plan: list, init: dict[str, torch.Tensor], lr: float) -> None:
        self.mode, self.plan, self.lr = mode, plan, lr
        self.state = {k: v.clone() for k, v in init.items()}
        self.opt_state: dict | None = None
        self.position, self.tokens, self.curve, self.rounds = 0, 0, [], []

    def steps(self, model, n: int, pad_id: int) -> None:
        """Train ``n`` more steps (wrapping around the plan); records this round's tokens/s."""
        load_adapter_state_dict(model, self.state, "default")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr)
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
        model.train()
        tokens, seconds = 0, 0.0
        for _ in range(n):
            rows = self.plan[self.position % len(self.plan)]
            self.position += 1
            batch = to_batch(self.mode, rows, pad_id)
            n_learned = int((batch["labels"][:, 1:] != -100).sum())
            t0 = time.perf_counter()
            loss = causal_lm_loss(model, batch, reduction="sum") / n_learned
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - t0
            tokens += sum(len(r) for r in rows)
            self.tokens += sum(len(r) for r in rows)
            self.curve.append((self.tokens, round(float(loss.detach()), 4)))
        self.rounds.append(tokens / seconds)
        self.state = {k: v.detach().clone() for k, v in adapter_state_dict(model, "default").items()}
        self.opt_state = opt.state_dict()


@torch.no_grad()
def same_loss_check(model, examples: list[Example], pad_id: int, max_length: int) -> dict[str, float]:
    """The summed loss of the same examples, padded and packed (fp32): they must agree."""
    model.eval()
    padded = causal_lm_loss(model, collate(examples, pad_id), reduction="sum")
    packed = causal_lm_loss(model, collate_packed(list(pack(examples, max_length)), pad_id), reduction="sum")
    return {"padded_loss_sum": float(padded), "packed_loss_sum": float(packed),
            "relative_difference": abs(float(packed) - float(padded)) / abs(float(padded))}  # fmt: skip


def load(name: str):
    """``(model, tokenizer)``; ``tiny-llama`` has no tokenizer (character ids)."""
    if name != "tiny-llama":
        return lorakit.load_model(name)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=4096)  # fmt: skip
    return LlamaForCausalLM(config), None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--modes", default="padded,packed")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps per mode per round")
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--eval-examples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--packed-batch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.json"))
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    prov = provenance()
    torch.set_num_threads(a.threads)
    modes = tuple(a.modes.split(","))
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
    plans = {m: batches(m, train, a.batch, packed_batch, a.max_length, seed=0) for m in modes}
    waste = {m: padding_waste([len(e) for e in train], [[len(r) for r in rows] for rows in plans[m]]) for m in modes}
    check = same_loss_check(model, train[: a.batch * 2], pad_id, a.max_length)
    print(f"same examples, padded vs packed loss: relative difference {check['relative_difference']:.2e}", flush=True)
    runs = {m: Run(m, plans[m], init, a.lr) for m in modes}
    warm = {m: Run(m, plans[m], init, a.lr) for m in modes}
    for m in modes:  # warm-up (allocator, first-call overheads), not recorded
        warm[m].steps(model, 1, pad_id)
    for rnd in range(a.rounds):
        for m in modes[rnd % len(modes) :] + modes[: rnd % len(modes)]:
            runs[m].steps(model, a.steps, pad_id)
            print(f"round {rnd} {m:8s} {runs[m].rounds[-1]:7.1f} tok/s  loss {runs[m].curve[-1][1]:.4f}", flush=True)
    evals = {}
    for m in modes:
        load_adapter_state_dict(model, runs[m].state, "default")
        evals[m] = eval_loss(model, held, pad_id, 8)
    load_adapter_state_dict(model, init, "default")
    evals["base"] = eval_loss(model, held, pad_id, 8)
    report(a, prov, runs, waste, plans, packed_batch, mean_len, check, evals)


def report(a, prov, runs, waste, plans, packed_batch, mean_len, check, evals) -> None:
    base = runs["padded"].rounds
    summary = {}
    for m, r in runs.items():
        ratios = [t / b for t, b in zip(r.rounds, base)]
        summary[m] = {"tokens_per_s": spread([round(t, 1) for t in r.rounds]),
                      "ratio_vs_padded": spread([round(x, 3) for x in ratios]),
                      "padding_waste": round(waste[m], 4), "batches_per_epoch": len(plans[m]),
                      "real_tokens_trained": r.tokens, "eval_loss_after": round(evals[m], 4),
                      "loss_curve": r.curve}  # fmt: skip
    out = {"benchmark": "bench_packing", "note": NOTE, "provenance": finish(prov), "model": a.model,
           "threads": a.threads, "examples": a.examples, "mean_length": round(mean_len, 1),
           "max_length": a.max_length, "batch": a.batch, "packed_batch": packed_batch, "rounds": a.rounds,
           "steps_per_round": a.steps, "lr": a.lr, "same_loss_check": check,
           "eval_loss_base": round(evals["base"], 4), "results": summary}  # fmt: skip
    write_results(a.out, out)
    print(f"\n{a.model}: {a.examples} examples, lengths 20..{a.max_length} (mean {mean_len:.0f}), {a.rounds} rounds x "
          f"{a.steps} steps per mode, {a.threads} thread(s)\n")  # fmt: skip
    print("| batching | padding waste | tokens/s (median, range) | vs padded (median, range) | eval loss after |")
    print("|---|---|---|---|---|")
    for m, s in summary.items():
        t, r = s["tokens_per_s"], s["ratio_vs_padded"]
        print(f"| {m} | {100 * s['padding_waste']:.1f}% | {t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f}) | "
              f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) | {s['eval_loss_after']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
