"""``lorakit train``: fine-tune a LoRA adapter (flags or a ``--config`` YAML of `TrainConfig` keys)."""

from __future__ import annotations

import argparse

from lorakit.cli.options import add_train_arguments, config_from_args, setup_logging

HELP = "fine-tune a LoRA adapter on JSONL data (flags or --config YAML)"


def add_args(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit train``; returns the process exit code (0 done, 130 interrupted by Ctrl-C).

    Raises:
        LorakitError: Bad config/data/output dir, or NaN loss (`TrainingStopped`); the CLI prints the message.
    """
    from lorakit.training.run import run_training

    setup_logging()
    cfg = config_from_args(args)
    result = run_training(cfg)
    if result.rank != 0:  # torchrun: one report, from rank 0
        return 0 if result.status == "completed" else 130
    if result.status != "completed":
        print(
            f"interrupted at step {result.steps}/{result.total_steps}; continue with: lorakit train --resume "
            f"--output-dir {result.output_dir} (same flags)"
        )
        return 130
    print()
    print(result.table())
    print(
        f"\ntrained {result.steps} steps in {result.train_seconds:.0f} s; adapter: {result.output_dir} "
        f"({result.adapter_bytes / 1e6:.2f} MB, {result.trainable_params:,d} trainable params)"
    )
    for s in result.samples[:1]:
        print(
            f"\nsample prompt:     {s['prompt']!r}\nsample reference:  {s['reference']}\n"
            f"sample prediction: {s['prediction']}"
        )
    return 0
