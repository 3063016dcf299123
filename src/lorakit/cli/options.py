"""Argument groups that several subcommands share (each subcommand's own flags live in its `lorakit.commands` module).

Training flags, LoRA flags, ``--target-modules`` parsing, model flags (``--revision``, ``--dtype``, ``--device``),
output folders, the 4-bit merge flags, logging set-up.

Every `TrainConfig` field has a flag spelled like its key with dashes; flags default to None so that only
flags actually given override the YAML file (``--config``), which overrides the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import Any

from lorakit.config import ALL_LINEAR, LoraConfig, default_alpha
from lorakit.errors import ConfigError, FormatError
from lorakit.io.peft_format import CONFIG_NAME
from lorakit.training.formats import FORMAT_CHOICES
from lorakit.training.train_config import TrainConfig, build_config

_HELP = {
    "data": "training data: JSONL/JSON/CSV/Parquet/Arrow file(s) (comma-separated or a glob), a folder of them, a "
    "save_to_disk folder, or a hub dataset id; rows: text, prompt/completion, messages, Alpaca or ShareGPT",
    "output_dir": "run directory: final adapter (PEFT format), checkpoint-N/ sub-folders, metrics.jsonl, loss.png",
    "model": "base model: embedded name (default smollm2-135m-instruct), Hub id (Org/Name), HF folder or .gguf file",
    "revision": "Hub branch, tag or commit sha of a Hub id --model (default: main)",
    "dtype": "dtype of the frozen base weights (auto: the checkpoint's dtype on CUDA, fp32 on the CPU)",
    "eval_data": "held-out data, any --data source (default: --eval-split of --data is held out)",
    "eval_ratio": "share of --data held out for eval when there is no --eval-data",
    "data_split": "split of a hub dataset or a saved DatasetDict",
    "data_config": "configuration (subset) name of a hub dataset",
    "eval_data_split": "split of --eval-data (default: --data-split)",
    "format": "row format: auto (detect per row), text, prompt_completion, messages, alpaca or sharegpt",
    "text_column": "column holding the text of text rows (default: text)",
    "prompt_column": "column holding the prompt (default: prompt)",
    "completion_column": "column holding the completion (default: completion)",
    "messages_column": "column holding the chat messages (default: messages)",
    "packing": "pack several examples into each --max-length row, attention confined to each example",
    "group_by_length": "batch examples of similar length together (less padding; ignored with --packing)",
    "report_to": "experiment trackers, comma-separated: tensorboard, mlflow, wandb (offline unless WANDB_MODE)",
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
_ALIASES = {"r": ["--lora-r"], "eval_ratio": ["--eval-split"]}
_CHOICES = {"dtype": ["auto", "bf16", "fp16", "fp32"], "precision": ["auto", "bf16", "fp32"],
            "lr_scheduler": ["cosine", "linear", "constant"], "format": list(FORMAT_CHOICES)}  # fmt: skip
_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per `TrainConfig` field to ``parser``."""
    parser.add_argument("--config", help="YAML file of TrainConfig keys; flags given here override it")
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        kwargs: dict[str, Any] = {"default": None, "help": _HELP.get(f.name, f"(default: {default})")}
        if f.name == "init_lora_weights":  # True/False or a name (pissa, olora, ...): not an on/off flag
            kwargs["type"] = init_value
            kwargs["help"] = "true | false | gaussian | pissa | pissa_niter_K | olora | loftq (default: true)"
        elif isinstance(default, bool):
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


def init_value(text: str) -> bool | str:
    """``--init-lora-weights`` value: "true"/"false" become booleans, other names stay strings."""
    return {"true": True, "false": False}.get(text.lower(), text)


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


def setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lorakit").setLevel(logging.INFO)


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
    alpha = args.lora_alpha if args.lora_alpha is not None else default_alpha(args.r)
    return LoraConfig(
        r=args.r,
        lora_alpha=alpha,
        lora_dropout=args.lora_dropout,
        target_modules=parse_target_modules(None if args.target_modules is None else [args.target_modules]),
        exclude_modules=parse_target_modules(None if args.exclude_modules is None else [args.exclude_modules]),
        **extra,
    )


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


# the fast engine's base weight formats (lorakit.inference.weights.WEIGHT_FORMATS; kept here so argument parsing
# does not import torch; tests/test_cli.py checks the two agree)
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "nf4")

MODEL_HELP = "base model: embedded name (e.g. smollm2-135m-instruct), Hub id (Org/Name), HF folder or .gguf file"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--revision``, ``--dtype`` and ``--device``: how the model named by ``--model`` (or MODEL) is loaded."""
    group = parser.add_argument_group("model loading")
    group.add_argument("--revision", default=None, help="Hub branch, tag or commit sha of a Hub id (default: main)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="parameter dtype (auto: the checkpoint's dtype on CUDA, fp32 on the CPU)",
    )
    group.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available; with accelerate, device_map=auto over all GPUs), cpu, cuda or cuda:N",
    )


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `lorakit.load_model` keyword arguments the model flags give."""
    return {"revision": args.revision, "dtype": args.dtype, "device": args.device}
