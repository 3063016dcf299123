"""``lorakit check ADAPTER --for RUNTIME``: what a serving runtime would reject or silently ignore.

Exit status 0 when the runtime serves the adapter as lorakit computes it, 1 when it cannot (refused, or loaded
and served differently). The command line the runtime needs is printed either way.
"""

from __future__ import annotations

import argparse

HELP = "say what vLLM, llama.cpp, LoRAX, TGI or PEFT would reject or silently ignore in an adapter"


def add_args(parser: argparse.ArgumentParser) -> None:
    from lorakit.runtimes import RUNTIMES

    parser.add_argument("adapter", help="PEFT-format adapter folder")
    parser.add_argument("--for", dest="runtime", required=True, choices=RUNTIMES, help="the serving runtime")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError
    from lorakit.export import adapter_facts, read_adapter_files, resolve_base
    from lorakit.runtimes import SOURCES, check, command, servable

    files = read_adapter_files(args.adapter)
    try:
        base = resolve_base(files, args.model)
    except (LorakitError, OSError, ImportError):
        if args.model is not None:
            raise
        base = None  # the target-list rules say they were not checked
    facts = adapter_facts(files, base, args.adapter)
    findings = check(facts, args.runtime)
    ok = servable(findings)
    print(f"{args.runtime}: rules read from {SOURCES[args.runtime]}")
    for finding in findings:
        print(f"  {finding.line()}")
    verdict = "can serve" if ok else "cannot serve"
    print(f"{verdict} {args.adapter} (rank {facts.max_rank}, targets {', '.join(sorted(facts.targets))})")
    print(f"command: {command(facts, args.runtime)}")
    return 0 if ok else 1
