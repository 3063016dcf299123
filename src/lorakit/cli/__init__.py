"""The ``lorakit`` command: thin subcommands that parse arguments, then call the library.

Bad input prints one line (``lorakit: error: ...``) and exits non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from lorakit.errors import LorakitError

EXIT_USAGE = 2
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (argparse prints the usage block first by default)."""

    def error(self, message: str) -> None:  # noqa: D102
        self.exit(EXIT_USAGE, f"lorakit: error: {message} (see `{self.prog} --help`)\n")


# Subcommands in the order `lorakit --help` lists them; each is a module of `lorakit.commands` with HELP,
# add_args(parser) and run(args) -> exit status. Imported when the parser is built, so `import lorakit` stays light.
COMMANDS = (
    "train",
    "eval",
    "info",
    "merge",
    "combine",
    "resize",
    "inspect",
    "sweep",
    "serve",
    "ui",
    "export",
    "check",
)


def _commands() -> dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]]:
    """The subcommands: name -> (help, add_arguments(parser), run(args) -> exit status)."""
    modules = {name: importlib.import_module(f"lorakit.commands.{name}") for name in COMMANDS}
    return {name: (m.HELP, m.add_args, m.run) for name, m in modules.items()}


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
