"""Argument wiring for ``lorakit train`` and ``lorakit eval`` (the CLI module calls these).

Every `TrainConfig` field has a flag spelled like its key with dashes; flags default to None so that only
flags actually given override the YAML file (``--config``), which overrides the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from typing import Any

from lorakit.train.config import TrainConfig, build_config

_HELP = {
    "data": "training data: a JSONL file or a directory of them (text, prompt/completion or messages rows)",
    "output_dir": "run directory: final adapter (PEFT format), checkpoint-N/ sub-folders, metrics.jsonl, loss.png",
    "model": "base model: embedded name (default smollm2-135m-instruct), HF directory or .gguf file",
    "eval_data": "held-out JSONL (default: --eval-ratio of --data is held out)",
    "target_modules": "module names / dotted suffixes (space- or comma-separated), 'all-linear', or one regex",
    "lora_alpha": "LoRA scale numerator (default: 2 * r)",
    "max_steps": "optimizer steps (overrides --num-epochs)",
    "loraplus_lr_ratio": "LoRA+: learning rate of the B matrices = ratio x --learning-rate (e.g. 16)",
    "batch_size": "examples per micro-batch per process (torchrun: global batch = this x accumulation x processes)",
    "global_batch_size": "examples per optimizer step over all processes; sets --batch-size (must divide evenly)",
    "fsdp": "under torchrun: FSDP2, shard the frozen base and the adapter across processes (default: replicate)",
    "dist_timeout": "under torchrun: seconds a collective waits for a dead or stalled process before failing",
    "eval_generate": "greedy-generation exact match of base and adapter before/after training",
    "precision": "auto: bf16 autocast where the hardware supports it (CUDA, AVX512-BF16/AMX CPUs), else fp32",
    "resume": "continue the run in --output-dir from its newest checkpoint",
    "overwrite": "replace the run in --output-dir",
    "quantize": "nf4: QLoRA, the frozen base in 4-bit NF4 (pure PyTorch) under full-precision adapters",
    "skip_bad_lines": "skip (and count) JSONL lines that are not JSON or lack the needed keys",
}
# torchrun's own parser reads abbreviations anywhere on its command line: "--r" is ambiguous there.
_ALIASES = {"r": ["--lora-r"]}
_CHOICES = {"precision": ["auto", "bf16", "fp32"], "lr_scheduler": ["cosine", "linear", "constant"]}
_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per `TrainConfig` field to ``parser``."""
    parser.add_argument("--config", help="YAML file of TrainConfig keys; flags given here override it")
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        kwargs: dict[str, Any] = {"default": None, "help": _HELP.get(f.name, f"(default: {default})")}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "target_modules":
            kwargs["nargs"] = "+"
        elif isinstance(default, int) or f.name in ("max_steps", "eval_steps", "max_new_tokens", "num_threads"):
            kwargs["type"] = int
        elif isinstance(default, float) or f.name == "loraplus_lr_ratio":
            kwargs["type"] = float
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        if f.name in _HELP and default not in (None, True, False):
            kwargs["help"] += f" (default: {default})"
        names = [_flag(f.name)] + _ALIASES.get(f.name, [])
        parser.add_argument(*names, dest=f.name, **kwargs)


def parse_target_modules(values: list[str] | None) -> Any:
    """``all-linear`` or a regex stays a string; names (space- or comma-separated) become a list."""
    if values is None:
        return None
    if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS.search(values[0])):
        return values[0]
    return [name.strip() for v in values for name in v.split(",") if name.strip()]


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``--config`` YAML < flags that were given."""
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    overrides["target_modules"] = parse_target_modules(overrides["target_modules"])
    return build_config(getattr(args, "config", None), **overrides)


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lorakit").setLevel(logging.INFO)


def train_from_args(args: argparse.Namespace) -> int:
    """Run ``lorakit train``; returns the process exit code (0 done, 130 interrupted by Ctrl-C).

    Raises:
        LorakitError: Bad config/data/output dir, or NaN loss (`TrainingStopped`); the CLI prints the message.
    """
    from lorakit.train.run import run_training

    _setup_logging()
    cfg = config_from_args(args)
    result = run_training(cfg)
    if result.rank != 0:  # torchrun: one report, from rank 0
        return 0 if result.status == "completed" else 130
    if result.status != "completed":
        print(f"interrupted at step {result.steps}/{result.total_steps}; continue with: lorakit train --resume "
              f"--output-dir {result.output_dir} (same flags)")  # fmt: skip
        return 130
    print()
    print(result.table())
    print(f"\ntrained {result.steps} steps in {result.train_seconds:.0f} s; adapter: {result.output_dir} "
          f"({result.adapter_bytes / 1e6:.2f} MB, {result.trainable_params:,d} trainable params)")  # fmt: skip
    for s in result.samples[:1]:
        print(f"\nsample prompt:     {s['prompt']!r}\nsample reference:  {s['reference']}\n"
              f"sample prediction: {s['prediction']}")  # fmt: skip
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lorakit eval``."""
    parser.add_argument("--model", default=None, help="base model (default: smollm2-135m-instruct)")
    parser.add_argument("--adapter", default=None, help="adapter folder (PEFT format); omitted: base model only")
    parser.add_argument("--data", required=True, help="JSONL with prompt/completion or messages rows")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16 tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                        help="render prompt/completion rows with the tokenizer's chat template")  # fmt: skip
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--skip-bad-lines", action="store_true")
    parser.add_argument("--weights", default="fp32", choices=["fp32", "bf16", "int8", "int4", "nf4"],
                        help="base weight format for generation (fast decode path; adapters stay fp32)")  # fmt: skip


def eval_from_args(args: argparse.Namespace) -> int:
    """Run ``lorakit eval``: base and (with ``--adapter``) adapter side by side; returns the exit code."""
    from lorakit.train.evaluate import run_eval

    _setup_logging()
    results = run_eval(
        model=args.model, adapter=args.adapter, data=args.data, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, chat_template=args.chat_template, precision=args.precision, limit=args.limit,
        skip_bad_lines=args.skip_bad_lines, weights=args.weights,
    )  # fmt: skip
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        from lorakit.train.evaluate import format_table

        print(format_table({k: v for k, v in results.items() if k in ("base", "adapter")}))
    return 0


# For the CLI's command table: name -> (help, add_arguments, run).
COMMANDS = {
    "train": ("fine-tune a LoRA adapter on JSONL data (flags or --config YAML)", add_train_arguments, train_from_args),
    "eval": ("greedy-generation exact match of the base model and an adapter, side by side", add_eval_arguments,
             eval_from_args),
}  # fmt: skip
