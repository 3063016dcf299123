"""Training-step speed and memory, and unmerged inference overhead: lorakit vs PEFT on the default model.

Each (config, repetition) runs in its own subprocess so peak RSS is that config's alone; the configs run in
alternating order, repetition after repetition, and each report is the median over repetitions. Configs:
- ``lower_bound``: the frozen base alone, forward + backward to the input embeddings (what any LoRA step must do);
- ``lorakit`` / ``peft`` with r=16 on q,k,v,o at dropout 0.05 and 0.0, and on all linear layers (dropout 0.05);
- ``full``: full fine-tuning (every weight trains, AdamW state for all of them).
A step is forward + backward + AdamW on a fixed batch (default 4 x 256 random tokens, every position labelled).
Inference (``--generate``): prompt forward and 64-token greedy generate, base vs unmerged adapter vs merged.

Run: python benchmarks/bench_speed.py [--reps 3] [--batch 4] [--seq 256] [--threads 1] [--generate]
Writes benchmarks/results/speed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "lower_bound": {},
    "lorakit_d0.05": {"lib": "lorakit", "dropout": 0.05, "targets": "attn"},
    "peft_d0.05": {"lib": "peft", "dropout": 0.05, "targets": "attn"},
    "lorakit_d0": {"lib": "lorakit", "dropout": 0.0, "targets": "attn"},
    "peft_d0": {"lib": "peft", "dropout": 0.0, "targets": "attn"},
    "lorakit_all_linear": {"lib": "lorakit", "dropout": 0.05, "targets": "all-linear"},
    "peft_all_linear": {"lib": "peft", "dropout": 0.05, "targets": "all-linear"},
    "full": {"lib": "full"},
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def peak_gib(device: str = "cpu") -> float:
    """This process's peak memory so far: RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    return _rss_gib()


def sync(device: str = "cpu") -> None:
    """Wait for queued device work (before reading a clock)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def build(name: str, batch: int, seq: int, device: str = "cpu"):
    """The default model set up as config ``name`` (train mode) and the fixed random batch ``(batch, seq)``."""
    import torch

    from lorakit.models import load_model

    model, _ = load_model("smollm2-135m-instruct")
    model.to(device).train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    spec = CONFIGS[name]
    targets = ATTN if spec.get("targets") == "attn" else "all-linear"
    if spec.get("lib") == "lorakit":
        import lorakit

        lorakit.add_adapter(
            model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=spec["dropout"])
        )
    elif spec.get("lib") == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=spec["dropout"])
        )
    elif name == "lower_bound":
        for p in model.parameters():
            p.requires_grad_(False)
    return model, ids


def step_loss(name: str, model, ids):
    """The step's loss; the lower bound takes its gradient to the input embeddings only (the base is frozen)."""
    if name == "lower_bound":
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        return model(inputs_embeds=embeds, labels=ids).loss
    return model(input_ids=ids, labels=ids).loss


def worker(name: str, batch: int, seq: int, threads: int, steps: int, device: str = "cpu") -> dict:
    import torch

    torch.set_num_threads(threads)
    model, ids = build(name, batch, seq, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None
    rss_loaded = peak_gib(device)

    def step() -> None:
        step_loss(name, model, ids).backward()
        if opt is not None:  # the lower bound has no optimizer
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocates optimizer state)
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for s in (opt.state.values() if opt else ())
        for t in s.values()
        if hasattr(t, "numel")
    )
    return {
        "step_s": statistics.median(times),
        "peak_rss_gib": peak_gib(device),  # on CUDA: peak allocated GPU memory
        "rss_after_load_gib": rss_loaded,
        "optimizer_state_bytes": optimizer_bytes,
    }


def generate_worker(threads: int, reps: int = 3, new_tokens: int = 64, device: str = "cpu") -> dict:
    """Median seconds of a prompt forward and a greedy generate: base, lorakit unmerged / merged, PEFT unmerged."""
    import copy

    import torch

    import lorakit

    torch.set_num_threads(threads)
    from lorakit.models import load_model

    base, tok = load_model("smollm2-135m-instruct")
    base.to(device)
    ids = tok(["Write a haiku about autumn leaves falling in the quiet forest at dusk."] * 4, return_tensors="pt")
    ids = ids.to(device)
    ours = lorakit.add_adapter(copy.deepcopy(base), lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=ATTN)).eval()
    with torch.no_grad():
        for t in lorakit.adapter_state_dict(ours, "default").values():
            t.normal_(0, 0.01)
    merged = copy.deepcopy(ours)
    lorakit.merge(merged)
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=ATTN)).eval()
    models = {"base": base, "lorakit": ours, "lorakit_merged": merged, "peft": theirs}
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    out = {f"{k}_{m}": [] for k in ("forward", "generate") for m in models}
    with torch.no_grad():
        for rep in range(reps + 1):  # the first round warms up
            for m, model in models.items():
                sync(device)
                start = time.perf_counter()
                model(**ids)
                sync(device)
                t1 = time.perf_counter()
                model.generate(**ids, **kw)
                sync(device)
                t2 = time.perf_counter()
                if rep:
                    out[f"forward_{m}"].append(t1 - start)
                    out[f"generate_{m}"].append(t2 - t1)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per worker (after one warm-up)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--generate", action="store_true", help="also measure inference overhead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.json"))
    args = parser.parse_args()
    if args.worker == "generate":
        print(json.dumps(generate_worker(args.threads)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.threads, args.steps)))
        return
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for rep in range(args.reps):
        for c in args.configs:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                c,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--threads",
                str(args.threads),
                "--steps",
                str(args.steps),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[c].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"rep {rep} {c}: {runs[c][-1]}", file=sys.stderr, flush=True)
    results = {"batch": args.batch, "seq": args.seq, "threads": args.threads, "reps": args.reps, "configs": {}}
    for c, rs in runs.items():
        results["configs"][c] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    if args.generate:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", "generate", "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        results["inference_s"] = json.loads(proc.stdout.strip().splitlines()[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    c = r["configs"]
    low = c.get("lower_bound")
    rows = [
        f"| step {r['batch']}x{r['seq']}, {r['threads']} thread(s) | time | x lower bound | peak RSS "
        "| above lower bound |",
        "|---|---|---|---|---|",
    ]
    for name, m in c.items():
        ratio = f"{m['step_s'] / low['step_s']:.2f}x" if low else "-"
        extra = f"{m['peak_rss_gib'] - low['peak_rss_gib']:+.2f} GiB" if low else "-"
        rows.append(f"| {name} | {m['step_s']:.2f} s | {ratio} | {m['peak_rss_gib']:.2f} GiB | {extra} |")
    inf = r.get("inference_s")
    if inf:
        for kind in ("forward", "generate"):
            b = inf[f"{kind}_base"]
            what = f"{kind} (4 prompts{', 64 new tokens' if kind == 'generate' else ''})"
            ours, merged, peft = (inf[f"{kind}_{m}"] / b for m in ("lorakit", "lorakit_merged", "peft"))
            rows.append(
                f"| {what}: lorakit unmerged / merged / PEFT unmerged, x base "
                f"| {ours:.2f}x / {merged:.2f}x / {peft:.2f}x | | | |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
