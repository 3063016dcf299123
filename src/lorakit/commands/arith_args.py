"""Flags shared by the adapter-arithmetic subcommands (``combine``, ``resize``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.errors import FormatError
from lorakit.io.peft_format import CONFIG_NAME


def add_out_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--out DIR`` (required) and ``--overwrite``."""
    parser.add_argument("--out", required=True, help="folder for the new PEFT-format adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")


def check_out(args: argparse.Namespace) -> Path:
    """``--out`` as a path; an existing adapter there is an error unless ``--overwrite`` (checked before any work)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FormatError(f"--out {str(out)!r} is a file; give a folder for the new adapter")
    if (out / CONFIG_NAME).exists() and not args.overwrite:
        raise FormatError(f"--out {str(out)!r} already holds an adapter; pass --overwrite or pick a new folder")
    return out
