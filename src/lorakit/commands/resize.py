"""``lorakit resize ADAPTER --rank k --out DIR``: truncated-SVD re-factorization, with the energy kept per layer."""

from __future__ import annotations

import argparse
import json
import warnings

from lorakit.cli.options import add_out_args, check_out

HELP = "re-factorize an adapter to another rank by truncated SVD"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="PEFT-format adapter folder")
    parser.add_argument("--rank", type=int, required=True, help="the new rank k (> 0)")
    add_out_args(parser)
    parser.add_argument("--json", action="store_true", help="print the per-layer report as JSON")


def run(args: argparse.Namespace) -> int:
    from lorakit.arith import resize_adapter

    out = check_out(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = resize_adapter(args.adapter, args.rank, out)
    energies = [r.energy_kept for r in result.layers.values()]
    if args.json:
        layers = {p: vars(r) for p, r in result.layers.items()}
        print(json.dumps({"out": str(out), "rank": args.rank, "layers": layers}, indent=2))
        return 0
    print(f"{'layer':<48} {'r':>5} {'->':>3} {'energy kept':>12}")
    for path, r in result.layers.items():
        note = "  (zero-padded)" if r.padded else ""
        print(f"{path:<48} {r.rank_before:>5} {r.rank_after:>3} {r.energy_kept:>12.2%}{note}")
    print(
        f"resized {args.adapter} to r={args.rank} -> {out}: energy kept min {min(energies):.2%}, "
        f"mean {sum(energies) / len(energies):.2%}"
    )
    for w in caught:
        print(f"note: {w.message}")
    return 0
