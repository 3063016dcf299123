"""``lorakit sweep``: train a grid of r / alpha / target sets on the same data and compare them."""

from __future__ import annotations

import argparse

HELP = "train a grid of r / alpha / target sets and compare them"


def add_args(parser: argparse.ArgumentParser) -> None:
    from lorakit.cli.options import add_train_arguments

    add_train_arguments(parser)  # the base run: --data, --output-dir, --config, --max-steps, ...
    grid = parser.add_argument_group("sweep grid")
    grid.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32], help="values of r (default 8 16 32)")
    grid.add_argument("--alphas", type=float, nargs="+", default=None, help="values of lora_alpha (default: 2r)")
    grid.add_argument(
        "--target-sets",
        nargs="+",
        default=["default", "all-linear"],
        choices=["default", "attention", "all-linear"],
        help="default: PEFT's targets for the architecture (as lorakit train/info); attention: q,k,v,o; "
        "all-linear (default: default and all-linear)",
    )
    grid.add_argument(
        "--metric",
        choices=["exact_match", "normalized_match", "eval_loss"],
        default=None,
        help="what 'best' means (default: exact_match with generation eval, else eval_loss)",
    )
    grid.add_argument(
        "--variants",
        nargs="+",
        default=["lora"],
        choices=["lora", "rslora", "dora", "pissa", "olora", "lora+"],
        help="LoRA variants to compare on every config (default: lora)",
    )
    grid.add_argument("--tolerance", type=float, default=0.01, help="'within one point' of the best (default 0.01)")


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.options import config_from_args
    from lorakit.training.grid import run_sweep

    base = config_from_args(args)
    base.require_paths()
    result = run_sweep(
        base, base.output_dir, args.ranks, args.alphas, args.target_sets, args.metric, args.tolerance, args.variants
    )
    print((result.output_dir / "sweep.md").read_text())
    print(f"best: {result.best}; cheapest within {args.tolerance:g} of it: {result.cheapest}")
    print("wrote " + ", ".join(str(f) for f in result.files))
    return 0
