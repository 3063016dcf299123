"""The ``lorakit`` command: thin subcommands that parse arguments, then call the library.

Bad input prints one line (``lorakit: error: ...``) and exits non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from lorakit.errors import LorakitError

EXIT_USAGE = 2
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (argparse prints the usage block first by default)."""

    def error(self, message: str) -> None:  # noqa: D102
        self.exit(EXIT_USAGE, f"lorakit: error: {message} (see `{self.prog} --help`)\n")


def _commands() -> dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]]:
    """The subcommands: name -> (help, add_arguments(parser), run(args) -> exit status)."""
    from lorakit.commands import check, combine, export, info, inspect, merge, resize, serve, sweep
    from lorakit.train.commands import COMMANDS as TRAIN_COMMANDS

    return {
        **TRAIN_COMMANDS,
        "info": (
            "show a model's modules, what a LoRA config would target, and parameter counts",
            info.add_args,
            info.run,
        ),
        "merge": (
            "merge an adapter into its base and write a plain Hugging Face model folder",
            merge.add_args,
            merge.run,
        ),
        "combine": ("combine adapters: weighted sum, SVD, TIES or DARE merge", combine.add_args, combine.run),
        "resize": ("re-factorize an adapter to another rank by truncated SVD", resize.add_args, resize.run),
        "inspect": ("singular-value spectra and effective rank of an adapter's updates", inspect.add_args, inspect.run),
        "sweep": ("train a grid of r / alpha / target sets and compare them", sweep.add_args, sweep.run),
        "serve": ("serve a base model and its adapters over an OpenAI-compatible API", serve.add_args, serve.run),
        "export": (
            "export an adapter to GGUF (llama.cpp, Ollama; or merged) or a flat PEFT adapter",
            export.add_args,
            export.run,
        ),
        "check": ("say what vLLM, llama.cpp, LoRAX, TGI or PEFT would reject or ignore", check.add_args, check.run),
    }


def build_parser() -> argparse.ArgumentParser:
    """The full ``lorakit`` argument parser."""
    parser = _Parser(prog="lorakit", description="LoRA fine-tuning: train, inspect, merge PEFT-format adapters.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for name, (help_text, add_args, run) in _commands().items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        add_args(cmd)
        cmd.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        result = args._run(args)
    except LorakitError as exc:
        if getattr(exc, "echoed_from_rank", None) is None:  # torchrun: rank 0 prints the errors all ranks share
            print(f"lorakit: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
    except (OSError, ImportError) as exc:
        print(f"lorakit: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
