"""lorakit vs PEFT, side by side in one process, on the embedded default model (SmolLM2-135M-Instruct).

Same inputs, same adapter weights, alternating repetitions, median of --reps. Reported as ratios:
- unmerged prompt forward (batch x seq) over the base model's, for lorakit and PEFT; merged lorakit;
- a training step (forward + backward + AdamW) with r=16 on q,k,v,o, lorakit over PEFT, dropout 0.05 and 0;
- adapter save and load time, and file size.

Run: python benchmarks/bench_core.py [--reps 5] [--batch 4] [--seq 128] [--threads 1]
Writes benchmarks/results/core.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import lorakit
from lorakit import LoraConfig
from lorakit.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _race(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable, run alternately (one warm-up each first)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _pair(base, dropout: float):
    ours = lorakit.add_adapter(
        copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=dropout)
    )
    theirs = get_peft_model(
        copy.deepcopy(base), PeftLoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=dropout)
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # identical non-zero adapters in both
        for path, layer in lorakit.layers.iter_lora_layers(ours):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
            peft_layer = theirs.base_model.model.get_submodule(path)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
    return ours, theirs


def _step_fn(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def adapter_io(base, ours, theirs, reps: int) -> dict:
    """Median save and load seconds and file bytes of the same adapter, lorakit vs PEFT (alternating)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fresh_ours, fresh_theirs = copy.deepcopy(base), copy.deepcopy(base)
        io = _race(
            {
                "lorakit_save": lambda: lorakit.save_adapter(ours, tmp / "ours"),
                "peft_save": lambda: theirs.save_pretrained(tmp / "theirs"),
            },
            reps,
        )
        load_ours = []
        load_theirs = []
        for _ in range(reps):
            model = copy.deepcopy(fresh_ours)
            load_ours.append(_timed(lambda m=model: lorakit.load_adapter(m, tmp / "ours")))
            model = copy.deepcopy(fresh_theirs)
            load_theirs.append(_timed(lambda m=model: PeftModel.from_pretrained(m, tmp / "theirs")))
        io["lorakit_load"] = statistics.median(load_ours)
        io["peft_load"] = statistics.median(load_theirs)
        io["lorakit_bytes"] = (tmp / "ours" / "adapter_model.safetensors").stat().st_size
        io["peft_bytes"] = (tmp / "theirs" / "adapter_model.safetensors").stat().st_size
    return io


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady numbers on a shared CPU)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "core.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, _ = load_model("smollm2-135m-instruct")
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    results: dict = {"shape": [args.batch, args.seq], "threads": torch.get_num_threads(), "reps": args.reps}

    ours, theirs = _pair(base, 0.05)
    for m in (base, ours, theirs):
        m.eval()
    merged_model = copy.deepcopy(ours)
    lorakit.merge(merged_model)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=0)
        fwd = _race(
            {
                "base": lambda: base(ids),
                "lorakit": lambda: ours(ids),
                "peft": lambda: theirs(ids),
                "lorakit_merged": lambda: merged_model(ids),
            },
            args.reps,
        )
    results["forward_s"] = fwd

    for dropout in (0.05, 0.0):
        ours, theirs = _pair(base, dropout)
        ours.train()
        theirs.train()
        results[f"train_step_s_dropout_{dropout}"] = _race(
            {"lorakit": _step_fn(ours, ids), "peft": _step_fn(theirs, ids)}, args.reps
        )

    io = adapter_io(base, ours, theirs, args.reps)
    results["adapter_io"] = io

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    f = r["forward_s"]
    io = r["adapter_io"]
    rows = [
        "| measure (SmolLM2-135M, CPU fp32, r=16 q,k,v,o) | lorakit | PEFT |",
        "|---|---|---|",
        f"| unmerged forward {r['shape'][0]}x{r['shape'][1]}, x base model "
        f"| {f['lorakit'] / f['base']:.2f}x | {f['peft'] / f['base']:.2f}x |",
        f"| merged forward, x base model | {f['lorakit_merged'] / f['base']:.2f}x | - |",
    ]
    for d in (0.05, 0.0):
        t = r[f"train_step_s_dropout_{d}"]
        rows.append(
            f"| train step (fwd+bwd+AdamW), dropout {d} "
            f"| {t['lorakit']:.2f} s ({t['lorakit'] / t['peft']:.2f}x PEFT) | {t['peft']:.2f} s |"
        )
    ms = {k: f"{v * 1e3:.0f}" for k, v in io.items() if not k.endswith("bytes")}
    rows.append(
        f"| adapter save / load | {ms['lorakit_save']} / {ms['lorakit_load']} ms "
        f"| {ms['peft_save']} / {ms['peft_load']} ms |"
    )
    rows.append(f"| adapter file size | {io['lorakit_bytes']:,d} B | {io['peft_bytes']:,d} B |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
