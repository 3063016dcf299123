"""``lorakit inspect ADAPTER [--model M] [--png out.png] [--json]``: is the update really low-rank?"""

from __future__ import annotations

import argparse
import json

HELP = "singular-value spectra and effective rank of an adapter's updates"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="PEFT-format adapter folder")
    parser.add_argument("--model", default=None, help="base model (embedded name, HF folder, .gguf) for ||dW||/||W||")
    parser.add_argument("--png", default=None, help="write a plot of the normalized singular-value spectra here")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")


def run(args: argparse.Namespace) -> int:
    from lorakit.arith import inspect_adapter
    from lorakit.io.factor_files import read_factors

    adapter = read_factors(args.adapter)  # a corrupt adapter fails before the model loads
    model = None
    if args.model is not None:
        from lorakit.models import load_model

        model, _ = load_model(args.model)
    report = inspect_adapter(adapter, model)
    if args.png:
        from lorakit.plots import spectra_png

        spectra_png(report, args.png)
    if args.json:
        print(json.dumps({**report.to_dict(), "png": args.png}, indent=2))
        return 0
    rel = model is not None
    print(f"{'layer':<48} {'r':>4} {'eff90':>6} {'eff99':>6} {'||dW||':>9}" + (f" {'||dW||/||W||':>13}" if rel else ""))
    for s in report.layers:
        line = f"{s.path:<48} {s.rank:>4} {s.effective_rank_90:>6} {s.effective_rank_99:>6} {s.delta_norm:>9.3g}"
        print(line + (f" {s.relative_norm:>13.3g}" if rel else ""))
    print(report.summary)
    for note in report.notes:
        print(f"note: {note}")
    if args.png:
        print(f"spectra plot -> {args.png}")
    return 0
