"""Every table of issue #5 in one run: lorakit vs PEFT side by side on the embedded default model.

One command measures, on the same inputs and in one process order:
- a training step (fwd + bwd + AdamW) for r=16 q,k,v,o at dropout 0.05 and 0.0 and all-linear, lorakit vs PEFT,
  the lower bound (frozen base: forward + input-gradient backward) and full fine-tuning: time and peak memory;
- QLoRA (NF4 base, r=16 all-linear) vs fp32 LoRA: step time and memory;
- the chunked cross-entropy of the trainer: a real ``lorakit train`` run (text rows, every position labelled),
  chunked vs unchunked (``lorakit.training.loss.CE_CHUNK_ROWS = 0``);
- unmerged inference latency over the base (prompt forward and greedy generate), merged lorakit, PEFT unmerged;
- adapter save / load time and file size, lorakit vs PEFT;
- the activation bytes each training config keeps for backward (bench_saved_memory.py; exact, not sampled).
Each training measurement runs in its own subprocess (its peak memory is its own: RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), all of them alternating, repetition after repetition; every
figure is the median over repetitions. Inference and adapter I/O alternate inside one process each.
The workers are those of bench_speed.py, bench_qlora.py and bench_core.py.

Run: python benchmarks/bench_issue5.py [--reps 5] [--batch 4] [--seq 256] [--threads 1] [--quick]
Writes benchmarks/results/issue5.json (``--quick``: a temporary file) and prints the Markdown tables.
``--inference-only [--reps 15]`` runs only the inference table, round by round (bench_inference.py), and writes
benchmarks/results/issue5_inference.json: per-round ratios to the base, median and range over all rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_speed  # noqa: E402 - a sibling script

WORDS = (
    "order ship city blue red green mug plate bowl spoon teapot lamp chair table two three four five express "
    "standard Oslo Bergen Cairo Lima quickly today tomorrow note please and with for the of"
).split()


def train_cli_worker(chunked: bool, batch: int, seq: int, threads: int, steps: int) -> dict:
    """A real ``lorakit train`` run on text rows of >= ``seq`` tokens; peak memory of the whole process."""
    import random

    import torch

    from lorakit.cli import main as cli_main
    from lorakit.training import loss as loss_mod

    if not chunked:
        loss_mod.CE_CHUNK_ROWS = 0
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(2 * seq))} for _ in range(batch * steps)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = ["train", "--data", str(data), "--output-dir", str(Path(tmp) / "out"), "--max-steps", str(steps),
                "--batch-size", str(batch), "--max-length", str(seq), "--precision", "fp32", "--num-threads",
                str(threads), "--eval-ratio", "0", "--save-steps", "100000", "--no-progress"]  # fmt: skip
        start = time.perf_counter()
        if cli_main(argv) != 0:
            raise RuntimeError("lorakit train failed")
        wall = time.perf_counter() - start
        metrics = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_s = [m["train_seconds"] for m in metrics if "train_seconds" in m]
    return {"peak_gib": bench_speed.peak_gib(device), "wall_s": wall, "train_s": train_s[-1] if train_s else None}


def adapter_io_worker(threads: int, reps: int, device: str) -> dict:
    import bench_core
    import torch

    from lorakit.models import load_model

    torch.set_num_threads(threads)
    base, _ = load_model("smollm2-135m-instruct")
    ours, theirs = bench_core._pair(base, 0.05)
    return bench_core.adapter_io(base, ours, theirs, reps)


def child(kind: str, a: dict) -> dict:
    """Run one measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(a["threads"])
    if kind == "train":
        return bench_speed.worker(a["name"], a["batch"], a["seq"], a["threads"], a["steps"], a["device"])
    if kind == "qlora":
        import bench_qlora

        return bench_qlora.worker(a["name"], a["batch"], a["seq"], a["steps"], a["device"])
    if kind == "ce":
        return train_cli_worker(a["name"] == "chunked", a["ce_batch"], a["seq"], a["threads"], a["ce_steps"])
    if kind == "generate":
        return bench_speed.generate_worker(a["threads"], a["reps"], a["new_tokens"], a["device"])
    if kind == "inference_rounds":
        import bench_inference

        return bench_inference.worker(a["threads"], a["reps"], a["new_tokens"], a["device"])
    if kind == "adapter_io":
        return adapter_io_worker(a["threads"], a["reps"], a["device"])
    if kind == "saved":
        import bench_saved_memory

        return {name: bench_saved_memory.saved_bytes(name, a["batch"], a["seq"], a["device"]) / 2**20
                for name in bench_saved_memory.MEASURED}  # fmt: skip
    raise ValueError(kind)


def spawn(kind: str, a: dict) -> dict:
    env = dict(os.environ)
    if kind == "qlora":  # as bench_qlora: RSS should follow live memory after the fp32 weights are freed
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--child", kind, json.dumps(a)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{kind} {a.get('name')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


PARTS = ("train", "qlora", "ce", "inference", "io", "saved")


def jobs(parts=PARTS) -> list[tuple[str, str]]:
    """The alternating subprocess measurements of ``parts``, in order."""
    every = [("train", name) for name in bench_speed.CONFIGS]
    every += [("qlora", "fp32"), ("qlora", "qlora"), ("ce", "unchunked"), ("ce", "chunked")]
    return [(kind, name) for kind, name in every if kind in parts]


def run(a: dict) -> dict:
    parts = a.get("parts", PARTS)
    runs: dict[str, list[dict]] = {f"{k}:{n}": [] for k, n in jobs(parts)}
    for rep in range(a["reps"]):
        for kind, name in jobs(parts):
            runs[f"{kind}:{name}"].append(spawn(kind, {**a, "name": name}))
            print(f"rep {rep} {kind}:{name}: {runs[f'{kind}:{name}'][-1]}", file=sys.stderr, flush=True)
    med = {key: {k: _median([r[k] for r in rs]) for k in rs[0]} for key, rs in runs.items()}
    out = {"settings": a, "train": {}, "qlora": {}, "chunked_ce": {}}
    for key, m in med.items():
        kind, name = key.split(":")
        out[{"train": "train", "qlora": "qlora", "ce": "chunked_ce"}[kind]][name] = m
    for part, key, kind in (("inference", "inference_s", "generate"), ("io", "adapter_io", "adapter_io"),
                            ("saved", "saved_for_backward_mib", "saved")):  # fmt: skip
        if part in parts:
            out[key] = spawn(kind, a)
    return {k: v for k, v in out.items() if v != {}}


def _median(values: list):
    return None if any(v is None for v in values) else statistics.median(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; --inference-only: 15 rounds)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="timed training steps per worker (after one warm-up)")
    p.add_argument("--ce-batch", type=int, default=8, help="batch of the lorakit train runs (the trainer's default)")
    p.add_argument("--ce-steps", type=int, default=2, help="optimizer steps of each lorakit train run")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="1 repetition of small shapes (a smoke test)")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="measure only these tables (a GPU session with little device time runs them in turns)",
    )
    p.add_argument("--inference-only", action="store_true", help="only the inference table, with its range")
    p.add_argument("--out", default=None, help="default: benchmarks/results/issue5.json (--quick: a temp file)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    import torch

    if args.inference_only:
        inference_only(args)
        return
    a = {"reps": args.reps or 5, "batch": args.batch, "seq": args.seq, "threads": args.threads, "steps": args.steps,
         "ce_batch": args.ce_batch, "ce_steps": args.ce_steps, "new_tokens": args.new_tokens, "parts": args.parts,
         "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}  # fmt: skip
    if args.quick:
        a.update(reps=1, batch=1, seq=32, ce_batch=2, ce_steps=1, new_tokens=4)
    out = Path(args.out or (Path(tempfile.gettempdir()) / "issue5_quick.json" if args.quick else HERE / "results" /
                            "issue5.json"))  # fmt: skip
    from provenance import finish, provenance

    prov = provenance()
    start = time.perf_counter()
    results = run(a)
    results["wall_s"] = time.perf_counter() - start
    results["torch_threads"] = args.threads
    results["provenance"] = finish(prov)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))
    print(f"\nwrote {out}")


def inference_only(args: argparse.Namespace) -> None:
    """Run the inference rounds in a fresh process; write issue5_inference.json and print the table."""
    import torch
    from provenance import finish, provenance, spread, write_results

    a = {"reps": args.reps or 15, "threads": args.threads, "new_tokens": args.new_tokens,
         "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}  # fmt: skip
    if args.quick:
        a.update(reps=1, new_tokens=4)
    prov = provenance()
    start = time.perf_counter()
    raw = spawn("inference_rounds", a)
    summary = {k: spread(v) for k, v in raw["ratio_to_base_same_round"].items()}
    base = {k: spread(raw["seconds"][f"{k}_base"]) for k in ("forward", "generate")}
    results = {"provenance": finish(prov), "settings": a, "wall_s": time.perf_counter() - start,
               "ratio_to_base": summary, "base_seconds": base, **raw}  # fmt: skip
    out = Path(args.out or (Path(tempfile.gettempdir()) / "issue5_inference_quick.json" if args.quick else HERE /
                            "results" / "issue5_inference.json"))  # fmt: skip
    write_results(out, results)
    print(inference_table(results))
    print(f"\nwrote {out}")


def inference_table(r: dict) -> str:
    """Markdown: per-round ratio to the base, median (min-max) over the rounds."""
    s, q = r["settings"], r["ratio_to_base"]
    lines = [f"| inference, 4 prompts, x base (median (min-max) of {s['reps']} rounds) | lorakit unmerged "
             "| lorakit merged | PEFT unmerged |", "|---|---|---|---|"]  # fmt: skip
    for kind, label in (("forward", "prompt forward"), ("generate", f"greedy generate, {s['new_tokens']} new tokens")):
        cells = [f"{q[f'{kind}_{m}']['median']:.3f}x ({q[f'{kind}_{m}']['min']:.2f}-{q[f'{kind}_{m}']['max']:.2f})"
                 for m in ("lorakit", "lorakit_merged", "peft")]  # fmt: skip
        lines.append(f"| {label} (base {r['base_seconds'][kind]['median']:.2f} s) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def tables(r: dict) -> str:
    """The Markdown tables of the README's issue-#5 section."""
    s = r["settings"]
    unit = "GPU GiB" if s["device"].startswith("cuda") else "RSS GiB"
    lines = [*_train_table(r["train"], s, unit)] if "train" in r else []
    if "inference_s" in r:
        lines += _inference_table(r["inference_s"], s)
    if "qlora" in r:
        lines += _qlora_table(r["qlora"], s)
    if "adapter_io" in r:
        io = r["adapter_io"]
        lines += ["", "**Adapter I/O** (r=16 q,k,v,o)", "", "| | lorakit | PEFT |", "|---|---|---|",
                  f"| save | {io['lorakit_save'] * 1e3:.0f} ms | {io['peft_save'] * 1e3:.0f} ms |",
                  f"| load | {io['lorakit_load'] * 1e3:.0f} ms | {io['peft_load'] * 1e3:.0f} ms |",
                  f"| file size | {io['lorakit_bytes']:,} B | {io['peft_bytes']:,} B |"]  # fmt: skip
    if "chunked_ce" in r:
        lines += _ce_table(r["chunked_ce"], s, unit)
    if "saved_for_backward_mib" in r:
        lines += ["", *_saved_table(r["saved_for_backward_mib"], s)]
    return "\n".join(lines)


def _train_table(t: dict, s: dict, unit: str) -> list[str]:
    low = t["lower_bound"]
    lines = [
        f"**Training step** ({s['device']}, fp32, batch {s['batch']} x {s['seq']}, {s['threads']} thread(s), "
        f"r=16, median of {s['reps']})",
        "",
        f"| config | step time | x lower bound | x PEFT | peak {unit} | above lower bound | x PEFT's "
        "| optimizer state |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in t.items():
        peer = t.get(name.replace("lorakit", "peft")) if name.startswith("lorakit") else None
        extra = m["peak_rss_gib"] - low["peak_rss_gib"]
        extra_peer = peer["peak_rss_gib"] - low["peak_rss_gib"] if peer else None
        lines.append(
            f"| {name} | {m['step_s']:.2f} s | {_x(m['step_s'], low['step_s'])} "
            f"| {_x(m['step_s'], peer['step_s']) if peer else '-'} | {m['peak_rss_gib']:.2f} | {extra:+.2f} GiB "
            f"| {_x(extra, extra_peer) if peer and extra_peer > 0 else '-'} "
            f"| {m['optimizer_state_bytes'] / 1e6:.1f} MB |"
        )
    return lines


def _inference_table(inf: dict, s: dict) -> list[str]:
    lines = ["", f"**Inference** (4 prompts; generate: {s['new_tokens']} new tokens, greedy), x base", "",
              "| | lorakit unmerged | lorakit merged | PEFT unmerged | lorakit overhead / PEFT's |",
              "|---|---|---|---|---|"]  # fmt: skip
    for kind in ("forward", "generate"):
        b = inf[f"{kind}_base"]
        ours, merged, peft = (inf[f"{kind}_{m}"] / b for m in ("lorakit", "lorakit_merged", "peft"))
        share = f"{(ours - 1) / (peft - 1):.2f}" if peft > 1 else "-"
        lines.append(f"| {kind} ({b:.3f} s base) | {ours:.3f}x | {merged:.3f}x | {peft:.3f}x | {share} |")
    return lines


def _qlora_table(qlora: dict, s: dict) -> list[str]:
    f, q = qlora["fp32"], qlora["qlora"]
    lines: list[str] = []
    mem = "GPU MiB" if s["device"].startswith("cuda") else "MiB"
    lines += ["", "**QLoRA** (NF4 + double quant, r=16 all-linear, dropout 0.05) vs fp32 LoRA", "",
              "| measure | fp32 LoRA | QLoRA | ratio |", "|---|---|---|---|"]  # fmt: skip
    for key, label in [("step_s", "step time (s)"), ("rss_setup_mib", f"after setup ({mem})"),
                       ("peak_mib", f"peak in steps ({mem})")]:  # fmt: skip
        lines.append(f"| {label} | {f[key]:.2f} | {q[key]:.2f} | {q[key] / f[key]:.2f} |")
    return lines


def _ce_table(ce: dict, s: dict, unit: str) -> list[str]:
    c, u = ce["chunked"], ce["unchunked"]
    lines = ["", f"**Chunked cross-entropy** (`lorakit train`, text rows, batch {s['ce_batch']} x {s['seq']}, "
              f"fp32, {s['ce_steps']} steps)", "", "| | unchunked | chunked | change |", "|---|---|---|---|",
              f"| peak {unit} | {u['peak_gib']:.2f} | {c['peak_gib']:.2f} "
              f"| {c['peak_gib'] - u['peak_gib']:+.2f} GiB |"]  # fmt: skip
    if c["train_s"] and u["train_s"]:
        lines.append(f"| train time | {u['train_s']:.2f} s | {c['train_s']:.2f} s | {_x(c['train_s'], u['train_s'])} |")
    return lines


def _saved_table(mib: dict, s: dict) -> list[str]:
    low = mib["lower_bound"]
    lines = [f"**Activations kept for backward** (batch {s['batch']} x {s['seq']}; lower bound {low:.1f} MiB)", "",
             "| config | lorakit above lower bound | PEFT above lower bound | ratio |",
             "|---|---|---|---|"]  # fmt: skip
    for ours, label in (("lorakit_d0.05", "q,k,v,o dropout 0.05"), ("lorakit_d0", "q,k,v,o dropout 0"),
                        ("lorakit_all_linear", "all-linear dropout 0.05")):  # fmt: skip
        a, b = mib[ours] - low, mib[ours.replace("lorakit", "peft")] - low
        lines.append(f"| {label} | {a:.1f} MiB | {b:.1f} MiB | {_x(a, b) if b > 0 else '-'} |")
    return lines


if __name__ == "__main__":
    main()
