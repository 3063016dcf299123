"""Activation memory a training step keeps for backward: lorakit vs PEFT vs the frozen base (the lower bound).

Peak RSS (bench_speed.py) mixes what autograd keeps with allocator slack and backward's transient buffers; this
counts exactly what the forward pass hands to backward. Every tensor autograd saves passes through a
``saved_tensors_hooks`` pack hook; the bytes of the distinct storages behind them (model parameters excluded) are
the activation memory the step holds at the end of its forward, its usual peak. Deterministic: one forward per
config, same model, same random batch (default 4 x 256, every position labelled), configs as in bench_speed.py.

Run: python benchmarks/bench_saved_memory.py [--batch 4] [--seq 256] [--threads 1]
Writes benchmarks/results/saved_memory.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_speed import CONFIGS, build, step_loss  # noqa: E402
from provenance import finish, provenance, write_results  # noqa: E402

MEASURED = [name for name in CONFIGS if name != "full"]


def saved_bytes(name: str, batch: int, seq: int, device: str = "cpu") -> int:
    """Bytes of the distinct non-parameter storages the forward of config ``name`` saves for backward."""
    import torch

    model, ids = build(name, batch, seq, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(name, model, ids)
    loss.backward()  # the saved tensors were all used (a sanity check that the step is complete)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "saved_memory.json"))
    args = parser.parse_args()
    import torch

    prov = provenance()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mib = {name: saved_bytes(name, args.batch, args.seq, device) / 2**20 for name in MEASURED}
    base = mib["lower_bound"]
    rows = []
    for ours, theirs, label in (("lorakit_d0.05", "peft_d0.05", "q,k,v,o dropout 0.05"),
                                ("lorakit_d0", "peft_d0", "q,k,v,o dropout 0"),
                                ("lorakit_all_linear", "peft_all_linear", "all-linear dropout 0.05")):  # fmt: skip
        over_ours, over_theirs = mib[ours] - base, mib[theirs] - base
        ratio = over_ours / over_theirs if over_theirs > 0 else None
        rows.append({"config": label, "lorakit_mib": mib[ours], "peft_mib": mib[theirs], "lorakit_over_base_mib":
                     over_ours, "peft_over_base_mib": over_theirs, "overhead_ratio": ratio})  # fmt: skip
    result = {"provenance": finish(prov), "batch": args.batch, "seq": args.seq, "device": device,
              "lower_bound_mib": base, "rows": rows}  # fmt: skip
    write_results(args.out, result)
    print(f"saved for backward, batch {args.batch} x {args.seq} ({device}); lower bound {base:.1f} MiB\n")
    print("| config | lorakit MiB | PEFT MiB | lorakit above lower bound | PEFT above lower bound | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if r["overhead_ratio"] is None else f"{r['overhead_ratio']:.2f}x"
        print(f"| {r['config']} | {r['lorakit_mib']:.1f} | {r['peft_mib']:.1f} | {r['lorakit_over_base_mib']:.1f} | "
              f"{r['peft_over_base_mib']:.1f} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
