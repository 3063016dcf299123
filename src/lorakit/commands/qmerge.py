"""The 4-bit (QLoRA) part of ``lorakit merge``: ``--quantized nf4 --mode dequant|nf4|original --merge-into``."""

from __future__ import annotations

import argparse

from lorakit.errors import ConfigError


def add_quant_args(parser: argparse.ArgumentParser) -> None:
    """Flags for merging an adapter that was trained on a 4-bit base."""
    group = parser.add_argument_group("4-bit base (QLoRA)")
    group.add_argument(
        "--quantized",
        choices=["nf4"],
        default=None,
        help="the adapter was trained on this 4-bit base (lorakit.quantize / lorakit train --quantize nf4)",
    )
    group.add_argument(
        "--no-double-quant", action="store_true", help="the base was quantized without double quantization"
    )
    group.add_argument(
        "--mode",
        choices=["dequant", "nf4", "original"],
        default=None,
        help="dequant: dense model from dequantized W + BA (default); nf4: re-quantized (small, outputs drift); "
        "original: BA added to --merge-into",
    )
    group.add_argument(
        "--merge-into",
        default=None,
        metavar="ORIGINAL",
        help="the original high-precision model (name, HF folder or .gguf) to add the update to (mode original)",
    )


def check_quant_args(args: argparse.Namespace) -> str | None:
    """The quantized merge mode the flags ask for (None: an ordinary merge); bad combinations raise ConfigError."""
    mode = args.mode or ("original" if args.merge_into else "dequant" if args.quantized else None)
    if mode is None:
        return None
    if not args.quantized:
        raise ConfigError(f"--mode {mode} / --merge-into merge from a 4-bit base; add --quantized nf4")
    if (mode == "original") != (args.merge_into is not None):
        raise ConfigError(
            "--mode original needs --merge-into ORIGINAL (the high-precision model)"
            if mode == "original"
            else f"--merge-into is only used with --mode original (got --mode {mode})"
        )
    return mode


def merge_quantized_model(args: argparse.Namespace, mode: str, model, probe):
    """Quantize ``model`` as it was for training, load the adapter, merge with ``mode``; returns (model, report)."""
    from lorakit import load_adapter
    from lorakit.io.quant_merge import merge_quantized
    from lorakit.models import load_model
    from lorakit.quant import quantize

    quantize(model, args.quantized, double_quant=not args.no_double_quant)
    load_adapter(model, args.adapter)
    original = load_model(args.merge_into)[0] if mode == "original" else None
    return merge_quantized(model, mode, merge_into=original, probe=probe)
