"""``lorakit merge``: fold an adapter into its base and write a plain Hugging Face model folder."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.errors import FormatError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model: embedded name, HF folder or .gguf file")
    parser.add_argument("--adapter", required=True, help="PEFT-format adapter folder")
    parser.add_argument("--out", required=True, help="output folder for the merged model (config + safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")


def run(args: argparse.Namespace) -> int:
    from lorakit import load_adapter, unload
    from lorakit.models import load_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise FormatError(f"--out {str(out)!r} already exists and is not empty; pass --overwrite or pick a new folder")
    model, tokenizer = load_model(args.model)
    load_adapter(model, args.adapter)
    probe = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    probe = probe.clamp(max=model.get_input_embeddings().num_embeddings - 1)  # a tokenizer larger than the model
    with torch.no_grad():
        before = model(probe).logits
        unload(model, merge=True)
        drift = (model(probe).logits - before).abs().max().item()  # merged vs unmerged, same probe
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {args.adapter} into {args.model} -> {out} (max |logit change| vs unmerged on a probe: {drift:.2e})")
    return 0
