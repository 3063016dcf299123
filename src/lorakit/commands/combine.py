"""``lorakit combine A B ... --weights w_A w_B ... --method M [--rank k] --out DIR``: adapter arithmetic."""

from __future__ import annotations

import argparse

from lorakit.cli.options import add_out_args, check_out
from lorakit.ops import ALIASES, METHODS

HELP = "combine adapters: weighted sum, SVD, TIES or DARE merge"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", help="PEFT-format adapter folders (trained on the same base model)")
    parser.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per adapter (default 1)")
    parser.add_argument(
        "--method",
        default="linear",
        choices=[*METHODS, *sorted(ALIASES)],
        help="linear: exact weighted sum (rank = sum of ranks); svd: that sum truncated to --rank; ties, "
        "dare_linear, dare_ties, magnitude_prune: merge the full updates (with --density), then SVD to --rank",
    )
    parser.add_argument("--rank", type=int, default=None, help="target rank of the SVD methods (default: max input r)")
    parser.add_argument("--density", type=float, default=None, help="fraction of entries kept (ties/dare/prune)")
    parser.add_argument("--majority-sign", default="total", choices=["total", "frequency"], help="TIES sign election")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default 0)")
    parser.add_argument("--ignore-base", action="store_true", help="allow different base_model_name_or_path values")
    add_out_args(parser)


def run(args: argparse.Namespace) -> int:
    from lorakit.arith import combine

    out = check_out(args)
    result = combine(
        args.adapters,
        args.weights,
        method=args.method,
        rank=args.rank,
        density=args.density,
        out=out,
        majority_sign=args.majority_sign,
        seed=args.seed,
        check_base=not args.ignore_base,
    )
    ranks = sorted({f.rank for f in result.layers.values()})
    shown = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    weights = args.weights or [1.0] * len(args.adapters)
    parts = " + ".join(f"{w:g} * {a}" for w, a in zip(weights, args.adapters))
    print(f"{args.method}: {parts} -> {out} ({len(result.layers)} layers, r={shown})")
    return 0
