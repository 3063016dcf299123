"""``lorakit eval``: greedy-generation exact match of the base model and an adapter, side by side."""

from __future__ import annotations

import argparse
import json

from lorakit.cli.options import WEIGHT_FORMATS, add_model_args, model_kwargs, setup_logging

HELP = "greedy-generation exact match of the base model and an adapter, side by side"


def add_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lorakit eval``."""
    parser.add_argument("--model", default=None, help="base model (default: smollm2-135m-instruct)")
    parser.add_argument(
        "--adapter", default=None, help="adapter folder (PEFT format) or Hub id (org/adapter); omitted: base model only"
    )
    add_model_args(parser)
    parser.add_argument("--data", required=True, help="eval rows, any source train takes: prompt/completion or chat")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16 tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="render prompt/completion rows with the tokenizer's chat template",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--skip-bad-lines", action="store_true")
    parser.add_argument(
        "--weights",
        default="fp32",
        choices=WEIGHT_FORMATS,
        help="base weight format for generation (fast decode path; adapters stay fp32)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``lorakit eval``: base and (with ``--adapter``) adapter side by side; returns the exit code."""
    from lorakit.training.evaluate import run_eval

    setup_logging()
    results = run_eval(
        model=args.model,
        adapter=args.adapter,
        data=args.data,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
        precision=args.precision,
        limit=args.limit,
        skip_bad_lines=args.skip_bad_lines,
        weights=args.weights,
        model_options=model_kwargs(args),
    )
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        from lorakit.training.evaluate import format_table

        print(format_table({k: v for k, v in results.items() if k in ("base", "adapter")}))
    return 0
