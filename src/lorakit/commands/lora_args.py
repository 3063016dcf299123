"""The LoRA flags shared by subcommands (named like the `LoraConfig` fields)."""

from __future__ import annotations

import argparse

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.train.commands import parse_target_modules


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--r``, ``--lora-alpha``, ``--lora-dropout``, ``--target-modules``, ``--exclude-modules``."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--r", type=int, default=16, help="rank (default 16)")
    group.add_argument("--lora-alpha", type=float, default=None, help="alpha (default 2*r)")
    group.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    group.add_argument(
        "--target-modules",
        default=None,
        help=f"comma-separated module names, '{ALL_LINEAR}', or a regex (default: attention projections)",
    )
    group.add_argument("--exclude-modules", default=None, help="comma-separated module names never adapted")


def lora_config_from_args(args: argparse.Namespace, **extra) -> LoraConfig:
    """A `LoraConfig` from the flags of `add_lora_args`."""
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.r
    return LoraConfig(
        r=args.r,
        lora_alpha=alpha,
        lora_dropout=args.lora_dropout,
        target_modules=parse_target_modules(None if args.target_modules is None else [args.target_modules]),
        exclude_modules=parse_target_modules(None if args.exclude_modules is None else [args.exclude_modules]),
        **extra,
    )
