"""QLoRA (4-bit NF4 base) vs fp32 LoRA on the embedded default model (SmolLM2-135M-Instruct), in one run.

Measures:
- storage: bytes of the quantized Linear weights (codes + scales) over their fp32 bytes (target <= 0.15);
- gradient equality: LoRA gradients on the NF4 model vs an fp32 model holding the dequantized weights;
- training: loss over --steps AdamW steps on a tiny text (QLoRA, r=16 all-linear);
- a training step (fwd + bwd + AdamW, r=16 all-linear, dropout 0.05), QLoRA vs fp32 LoRA: median time, RSS
  after setup and peak RSS during the steps, each variant in its own subprocesses (alternating; the peak is reset
  with /proc/self/clear_refs after setup; weights copied out of the safetensors memory map first);
- merge drift of the three merge modes (dequant, nf4, original) on a probe batch.

Run: python benchmarks/bench_qlora.py [--batch 2] [--seq 128] [--reps 3] [--steps 20] [--threads 1]
Writes benchmarks/results/qlora.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import finish, json_worker, provenance, reset_peak_rss, status_kib, write_results

import lorakit
from lorakit import LoraConfig
from lorakit.models import load_model
from lorakit.quant import is_quantized, quantize, quantized_bytes
from lorakit.quant_merge import merge_quantized

TEXT = (
    "Order 1042: two blue mugs, one teapot, ship to Oslo. Order 1043: three red plates, ship to Bergen. "
    "Order 1044: one green bowl and four spoons, ship to Tromso. "
)


def _config(dropout: float = 0.0, init: bool = True) -> LoraConfig:
    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=init)


def worker(kind: str, batch: int, seq: int, reps: int, device: str = "cpu") -> dict:
    """One variant's step time and peak memory, in a fresh process (so peaks do not mix).

    On CUDA the memory figures are allocated GPU memory (``torch.cuda``) instead of RSS.
    """
    cuda = device.startswith("cuda")
    model, _ = load_model("smollm2-135m-instruct")
    with torch.no_grad():  # own the weights: safetensors loads them memory-mapped, and the file mapping (kept
        for p in model.parameters():  # alive by any one tensor) would stay resident after quantization
            p.data = p.data.clone()
    gc.collect()
    model.to(device)
    if kind == "qlora":
        quantize(model, "nf4")
        gc.collect()
    lorakit.add_adapter(model, _config(dropout=0.05))
    model.train()
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up; creates the optimizer state
    if cuda:
        torch.cuda.synchronize(device)
        rss_setup = torch.cuda.memory_allocated(device) / 1024
        torch.cuda.reset_peak_memory_stats(device)
    else:
        rss_setup = status_kib("VmRSS")
        if not reset_peak_rss():  # the peak (VmHWM) restarts from the current RSS
            raise RuntimeError("/proc/self/clear_refs is not writable: the step's peak RSS cannot be measured")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1024 if cuda else status_kib("VmHWM")
    return {"step_s": statistics.median(times), "rss_setup_mib": rss_setup / 1024, "peak_mib": peak / 1024,
            "step_peak_above_setup_mib": (peak - rss_setup) / 1024}  # fmt: skip


def _run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(args.batch), "--seq", str(args.seq),
           "--reps", str(args.reps), "--threads", str(args.threads)]  # fmt: skip
    # A fixed mmap threshold: glibc otherwise raises it as big blocks are freed (e.g. the fp32 weights replaced by
    # NF4 codes), keeps later frees in its heap and RSS stops reflecting live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return json_worker(cmd, env)


def _alternate(args) -> dict[str, dict]:
    """Each variant ``--rounds`` times, alternating; the median of every measure."""
    runs: dict[str, list[dict]] = {"fp32": [], "qlora": []}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(_run_worker(kind, args))
    return {kind: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for kind, rs in runs.items()}


def grad_equality(base, tokenizer) -> dict:
    qmodel, dense = copy.deepcopy(base), copy.deepcopy(base)
    quantize(qmodel, "nf4")
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if is_quantized(module):
                dense.get_submodule(name).weight.copy_(module.dequantized_weight())
    for m in (qmodel, dense):
        torch.manual_seed(1)
        lorakit.add_adapter(m, _config(init=False))
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :48]
    for m in (qmodel, dense):
        m(ids, labels=ids).loss.backward()
    q, d = lorakit.adapter_state_dict(qmodel, "default"), lorakit.adapter_state_dict(dense, "default")
    diff = max((q[k].grad - d[k].grad).abs().max().item() for k in q)
    scale = max(d[k].grad.abs().max().item() for k in d)
    return {"max_abs_grad_diff": diff, "max_abs_grad": scale, "tensors": len(q)}


def train_curve(base, tokenizer, steps: int) -> list[float]:
    model = copy.deepcopy(base)
    quantize(model, "nf4")
    torch.manual_seed(0)
    lorakit.add_adapter(model, _config(dropout=0.05))
    model.train()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses, model


def merge_drift(base, trained, tokenizer) -> dict:
    probe = tokenizer([TEXT[:60], TEXT[60:120]], return_tensors="pt", padding=True).input_ids
    out = {}
    for mode in ("dequant", "nf4", "original"):
        model = copy.deepcopy(trained)
        original = copy.deepcopy(base) if mode == "original" else None
        _, report = merge_quantized(model, mode, merge_into=original, probe=probe)
        out[mode] = {"max_abs_logit_delta": report.max_abs_logit_delta, "top1_agreement": report.top1_agreement,
                     "adapter_max_abs_logit": report.adapter_max_abs_logit}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="worker processes per variant, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=["qlora", "fp32"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.reps)))
        return
    prov = provenance()
    base, tokenizer = load_model("smollm2-135m-instruct")
    q = copy.deepcopy(base)
    start = time.perf_counter()
    quantize(q, "nf4")
    storage = {**quantized_bytes(q), "quantize_s": time.perf_counter() - start}
    del q
    grads = grad_equality(base, tokenizer)
    losses, trained = train_curve(base, tokenizer, args.steps)
    drift = merge_drift(base, trained, tokenizer)
    steps = _alternate(args)
    result = {"provenance": finish(prov), "model": "smollm2-135m-instruct", "batch": args.batch, "seq": args.seq,
              "threads": args.threads,
              "device": "cpu", "storage": storage, "grad_equality": grads, "qlora_losses": losses,
              "merge_drift": drift, "step": steps}  # fmt: skip
    out = write_results(Path(__file__).parent / "results" / "qlora.json", result)
    f, ql = steps["fp32"], steps["qlora"]
    print("| measure | fp32 LoRA | QLoRA (NF4 + double quant) | ratio |\n|---|---|---|---|")
    print(f"| Linear weight bytes (blocks) | {storage['fp32_bytes'] / 2**20:.1f} MiB | "
          f"{storage['bytes'] / 2**20:.1f} MiB | {storage['ratio']:.3f} |")  # fmt: skip
    for key, label in [
        ("rss_setup_mib", "RSS after setup (MiB)"),
        ("peak_mib", "peak RSS in steps (MiB)"),
        ("step_peak_above_setup_mib", "step peak above setup (MiB)"),
        ("step_s", "step time (s)"),
    ]:
        print(f"| {label} | {f[key]:.2f} | {ql[key]:.2f} | {ql[key] / f[key]:.2f} |")  # fmt: skip
    print(f"\nLoRA grads, NF4 vs fp32-with-dequantized-weights: max |diff| {grads['max_abs_grad_diff']:.2e} "
          f"(max |grad| {grads['max_abs_grad']:.2e}, {grads['tensors']} tensors)")  # fmt: skip
    print(f"QLoRA loss over {args.steps} steps: {losses[0]:.3f} -> {losses[-1]:.3f}")
    for mode, d in drift.items():
        print(f"merge {mode}: max |delta logit| {d['max_abs_logit_delta']:.3e}, top-1 {100 * d['top1_agreement']:.1f}% "
              f"(the adapter itself moves logits by up to {d['adapter_max_abs_logit']:.3e})")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
