"""Should a sweep train its configs at once through per-row routing, or one after another? Measure it.

Three adapters of a sweep (r = 8, 16, 32 on q,k,v,o) on the default model, one optimizer step each on the
same batch: either three ordinary steps one after another, or one step where the batch is repeated once per
adapter and routed (`lorakit.route`), so one forward/backward trains all three on one copy of the base.
Each mode runs in its own subprocess (peak RSS is that mode's); alternating repetitions, median time.

Run: python benchmarks/bench_sweep_concurrency.py [--reps 3] [--batch 4] [--seq 128] [--threads 1]
Writes benchmarks/results/sweep_concurrency.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from provenance import finish, json_worker, provenance, write_results

RANKS = (8, 16, 32)


def worker(mode: str, batch: int, seq: int, threads: int) -> dict:
    import torch

    import lorakit
    from lorakit.models import load_model

    torch.set_num_threads(threads)
    model, _ = load_model("smollm2-135m-instruct")
    model.train()
    names = [f"r{r}" for r in RANKS]
    for r, name in zip(RANKS, names):
        cfg = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        lorakit.add_adapter(model, cfg, name=name)
    lorakit.set_trainable(model, names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def sequential() -> None:
        for name in names:
            lorakit.set_adapter(model, name)
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def routed() -> None:
        rows = [n for n in names for _ in range(batch)]
        with lorakit.route(model, rows):
            # mean over all rows = (sum of the per-adapter means) / 3: scale back to each adapter's own loss
            (model(input_ids=ids.repeat(len(names), 1), labels=ids.repeat(len(names), 1)).loss * len(names)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = sequential if mode == "sequential" else routed
    step()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": min(times), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_concurrency.json"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq, args.threads)))
        return
    prov = provenance()
    runs: dict[str, list[dict]] = {"sequential": [], "routed": []}
    for _ in range(args.reps):
        for mode in runs:
            cmd = [sys.executable, __file__, "--worker", mode, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--threads", str(args.threads)]  # fmt: skip
            runs[mode].append(json_worker(cmd))
    res = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    result = {"provenance": finish(prov), "batch": args.batch, "seq": args.seq, "threads": args.threads,
              "ranks": RANKS, "modes": res}  # fmt: skip
    write_results(args.out, result)
    s, r = res["sequential"], res["routed"]
    print("| 3 sweep configs, one step each | time | peak RSS |\n|---|---|---|")
    print(f"| one after another | {s['step_s']:.2f} s | {s['peak_rss_gib']:.2f} GiB |")
    print(f"| at once through routing | {r['step_s']:.2f} s ({r['step_s'] / s['step_s']:.2f}x) "
          f"| {r['peak_rss_gib']:.2f} GiB ({r['peak_rss_gib'] / s['peak_rss_gib']:.2f}x) |")  # fmt: skip


if __name__ == "__main__":
    main()
