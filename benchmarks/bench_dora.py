"""DoRA training step: lorakit vs PEFT's DoRA, side by side (time, activations kept for backward, peak RSS).

Model: a random Llama with SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 9 heads / 3 KV heads), 4 blocks,
vocabulary 4096; DoRA r=16 on every linear layer (q, k, v, o, gate, up, down), dropout 0; fp32 on the CPU.
Both libraries start from the same base weights and the same adapter tensors.

- step time: forward + backward of one batch, the two libraries alternating, median and range of the ratio
  over ``--repeats`` pairs (the box is shared, so single timings are noisy; the ratio of neighbours is not);
- saved for backward: bytes of the distinct non-parameter storages autograd keeps (deterministic);
- peak RSS: one step in a fresh process per library (alternating), ``ru_maxrss`` minus the RSS before the step.

Run: OMP_NUM_THREADS=2 python benchmarks/bench_dora.py [--batch 4] [--seq 128] [--repeats 7]
Writes benchmarks/results/dora.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "dora.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=4096, max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(cfg).train()


def build(lib: str, base=None):
    """``(model, trainable params)`` with DoRA on every linear layer; B and m moved off their init (seeded)."""
    base = base_model() if base is None else copy.deepcopy(base)
    if lib == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True))
        params = [p for n, p in model.named_parameters() if p.requires_grad]
    else:
        import lorakit

        torch.manual_seed(1)
        lorakit.add_adapter(base, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, use_dora=True))
        model, params = base, list(lorakit.adapter_state_dict(base, "default").values())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sorted(params, key=lambda t: tuple(t.shape)):
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    model.train()
    return model, params


def step(model, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(storages.values())


def rss_worker(lib: str, batch: int, seq: int) -> None:
    """Print the peak-RSS growth (bytes) of one step, measured in this fresh process."""
    model, _ = build(lib)
    ids = torch.randint(0, 4096, (batch, seq), generator=torch.Generator().manual_seed(3))
    import gc

    gc.collect()
    before = _rss_bytes()  # model and adapter built, no step yet
    step(model, ids)
    step(model, ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": max(peak - before, 0), "peak": peak, "before": before}))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rss-repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["lorakit", "peft"])
    args = parser.parse_args()
    if args.worker:
        rss_worker(args.worker, args.batch, args.seq)
        return
    base = base_model()
    models = {lib: build(lib, base)[0] for lib in ("lorakit", "peft")}
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (models["lorakit"](ids).logits - models["peft"](ids).logits).abs().max().item()
    times: dict[str, list[float]] = {"lorakit": [], "peft": []}
    for lib in times:
        step(models[lib], ids)  # warm-up
    for i in range(args.repeats):
        for lib in ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit"):
            t0 = time.perf_counter()
            step(models[lib], ids)
            times[lib].append(time.perf_counter() - t0)
    ratios = [a / b for a, b in zip(times["lorakit"], times["peft"])]
    print("step times", times, flush=True)
    saved = {lib: saved_bytes(m, ids) for lib, m in models.items()}
    print("saved bytes", saved, flush=True)
    rss: dict[str, list[int]] = {"lorakit": [], "peft": []}  # --rss-repeats 0 skips this part
    for i in range(args.rss_repeats):
        for lib in ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit"):
            cmd = [sys.executable, __file__, "--worker", lib, "--batch", str(args.batch), "--seq", str(args.seq)]
            rss[lib].append(json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])["growth"])
            print("rss", lib, rss[lib][-1], flush=True)
    mib = 2**20
    rss_report = {lib: {"median": round(statistics.median(v) / mib, 1), "min": round(min(v) / mib, 1),
                        "max": round(max(v) / mib, 1)} for lib, v in rss.items() if v}  # fmt: skip
    result = {
        "command": "python benchmarks/bench_dora.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   "shared with other jobs (timings noisy; ratios of alternating neighbours reported)",
        "setup": f"Llama 4 blocks, SmolLM2-135M shapes, DoRA r=16 on {TARGETS}, batch {args.batch} x {args.seq}, fp32",
        "max_logit_diff_vs_peft": diff,
        "step_seconds": {lib: {"median": statistics.median(t), "min": min(t), "max": max(t)}
                         for lib, t in times.items()},
        "step_ratio_lorakit_over_peft": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "saved_for_backward_mib": {lib: round(b / mib, 1) for lib, b in saved.items()},
        "saved_ratio_lorakit_over_peft": round(saved["lorakit"] / saved["peft"], 3),
        "peak_rss_growth_mib": rss_report or "not measured (--rss-repeats 0)",
    }  # fmt: skip
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
