"""``lorakit merge``: fold an adapter into its base and write a plain Hugging Face model folder.

With ``--quantized nf4`` the adapter was trained on a 4-bit base: the base is quantized as it was for training
and merged with `lorakit.merge_quantized` (modes dequant, nf4, original).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.cli.options import MODEL_HELP, add_model_args, add_quant_args, check_quant_args, model_kwargs
from lorakit.errors import FormatError
from lorakit.io.atomic import replace_dir

HELP = "merge an adapter into its base and write a plain Hugging Face model folder"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--adapter", required=True, help="PEFT-format adapter folder, or a Hub id (org/adapter)")
    add_model_args(parser)
    parser.add_argument("--out", required=True, help="output folder for the merged model (config + safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    add_quant_args(parser)


def run(args: argparse.Namespace) -> int:
    from lorakit import load_adapter, unload
    from lorakit.models import load_model

    mode = check_quant_args(args)  # bad flags fail before any model loads
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FormatError(f"--out {str(out)!r} already exists and is not empty; pass --overwrite or pick a new folder")
    model, tokenizer = load_model(args.model, **model_kwargs(args))
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    probe = probe.clamp(max=model.get_input_embeddings().num_embeddings - 1)  # a tokenizer larger than the model
    if mode is not None:
        model, report = merge_quantized_model(args, mode, model, probe)
        message = report.summary()
        if mode == "nf4":
            message += "; the folder holds NF4 codes: load it with lorakit.quantize(base) + load_state_dict"
    else:
        load_adapter(model, args.adapter)
        with torch.no_grad():
            before = model(probe).logits
            unload(model, merge=True)
            drift = (model(probe).logits - before).abs().max().item()  # merged vs unmerged, same probe
        message = f"max |logit change| vs unmerged on a probe: {drift:.2e}"
    print(message)  # the drift is shown before anything is written
    _write(model, tokenizer, out)
    print(f"merged {args.adapter} into {args.merge_into or args.model} -> {out}")
    return 0


def _write(model, tokenizer, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_quantized_model(args: argparse.Namespace, mode: str, model, probe):
    """Quantize ``model`` as it was for training, load the adapter, merge with ``mode``; returns (model, report)."""
    from lorakit import load_adapter
    from lorakit.models import load_model
    from lorakit.quant import quantize
    from lorakit.quant_merge import merge_quantized

    quantize(model, args.quantized, double_quant=not args.no_double_quant)
    load_adapter(model, args.adapter)
    original = load_model(args.merge_into)[0] if mode == "original" else None
    return merge_quantized(model, mode, merge_into=original, probe=probe)
