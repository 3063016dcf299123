"""DoRA training step: lorakit vs PEFT's DoRA, side by side (time, activations kept for backward, peak RSS).

Model: a random Llama with SmolLM2-135M's layer shapes (hidden 576, MLP 1536, 9 heads / 3 KV heads), 4 blocks,
vocabulary 4096; DoRA r=16 on every linear layer (q, k, v, o, gate, up, down), dropout 0; fp32 on the CPU.
Both libraries start from the same base weights and the same adapter tensors (PEFT's, copied into lorakit's
layers), so ``max_logit_diff_vs_peft`` is a correctness check of the benchmarked models.

- step time: forward + backward of one batch, the two libraries alternating, median and range of the ratio
  over ``--repeats`` pairs (the box is shared, so single timings are noisy; the ratio of neighbours is not);
- saved for backward: bytes of the distinct non-parameter storages autograd keeps (deterministic);
- peak RSS: two training steps in a fresh process per library and repeat, the libraries alternating; the
  process's peak RSS (``VmHWM``) is reset after the model and adapter are built (``/proc/self/clear_refs``), so
  the growth is what the steps themselves need (activations, temporaries, gradients); median and range over
  ``--rss-repeats`` processes per library. torch has no CPU allocator statistics, hence RSS.
- load averages (1/5/15 min) at the start and the end go into the file: they say how busy the box was.

Run: OMP_NUM_THREADS=2 python benchmarks/bench_dora.py [--batch 2] [--seq 64] [--repeats 5] [--rss-repeats 3]
Writes benchmarks/results/dora.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from provenance import finish, json_worker, provenance, reset_peak_rss, status_kib, write_results

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


@torch.no_grad()
def copy_adapter(peft_model, model) -> None:
    """Put PEFT's adapter tensors into lorakit's layers (same keys but for PEFT's prefix and magnitude suffix)."""
    import lorakit

    theirs = {}
    for key, p in peft_model.named_parameters():
        if "lora_" in key:
            key = key.removeprefix("base_model.model.")
            theirs[key.removesuffix(".weight") if "magnitude" in key else key] = p
    ours = lorakit.adapter_state_dict(model, "default")
    if sorted(ours) != sorted(theirs):
        raise RuntimeError(f"adapter keys differ: {sorted(set(ours) ^ set(theirs))[:4]}")
    for key, p in ours.items():
        p.copy_(theirs[key])


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
    probe = "VmHWM reset by /proc/self/clear_refs"
    if not reset_peak_rss():  # then ru_maxrss, which may hide a step that needs less than the build did
        probe = "ru_maxrss (clear_refs not writable: growth is a lower bound)"
    before = status_kib("VmRSS") * 1024  # model and adapter built, no step yet
    step(model, ids)
    step(model, ids)
    peak = status_kib("VmHWM") * 1024
    if probe.startswith("ru_maxrss"):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": max(peak - before, 0), "peak": peak, "before": before, "probe": probe}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rss-repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["lorakit", "peft"])
    args = parser.parse_args()
    if args.worker:
        rss_worker(args.worker, args.batch, args.seq)
        return
    prov = provenance()  # machine, load, commit, command; finish() adds the end time and load
    base = base_model()
    models = {lib: build(lib, base)[0] for lib in ("lorakit", "peft")}
    copy_adapter(models["peft"], models["lorakit"])
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
    rss, probe = measure_rss(args)
    mib = 2**20
    rss_report = {lib: {"median": round(statistics.median(v) / mib, 1), "min": round(min(v) / mib, 1),
                        "max": round(max(v) / mib, 1)} for lib, v in rss.items() if v}  # fmt: skip
    rss_ratios = [a / b for a, b in zip(rss["lorakit"], rss["peft"])]
    result = {
        "provenance": finish(prov),
        "threads": torch.get_num_threads(),
        "setup": f"Llama 4 blocks, SmolLM2-135M shapes, DoRA r=16 on {TARGETS}, batch {args.batch} x {args.seq}, fp32",
        "max_logit_diff_vs_peft": diff,
        "step_seconds": {lib: {"median": statistics.median(t), "min": min(t), "max": max(t)}
                         for lib, t in times.items()},
        "step_ratio_lorakit_over_peft": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
        "saved_for_backward_mib": {lib: round(b / mib, 1) for lib, b in saved.items()},
        "saved_ratio_lorakit_over_peft": round(saved["lorakit"] / saved["peft"], 3),
        "peak_rss_growth_mib": rss_report or "not measured (--rss-repeats 0)",
        "peak_rss_probe": probe,
        "peak_rss_ratio_lorakit_over_peft": {"median": statistics.median(rss_ratios), "min": min(rss_ratios),
                                             "max": max(rss_ratios)} if rss_ratios else None,
    }  # fmt: skip
    write_results(OUT, result)
    print(json.dumps(result, indent=2))


def measure_rss(args) -> tuple[dict[str, list[int]], str]:
    """Peak-RSS growth per library, one fresh process each, alternating (``--rss-repeats 0`` skips it)."""
    rss: dict[str, list[int]] = {"lorakit": [], "peft": []}
    probe = ""
    for i in range(args.rss_repeats):
        for lib in ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit"):
            cmd = [sys.executable, __file__, "--worker", lib, "--batch", str(args.batch), "--seq", str(args.seq)]
            report = json_worker(cmd)
            rss[lib].append(report["growth"])
            probe = report["probe"]
            print("rss", lib, report, flush=True)
    return rss, probe


if __name__ == "__main__":
    main()
