"""``lorakit export ADAPTER --to gguf|peft --out PATH``: ship an adapter to llama.cpp, Ollama, vLLM & co.

The runtime check (`lorakit.runtimes`) runs first: what the target runtime would reject or silently ignore
stops the export with the reasons; what lorakit folds into the tensors (rsLoRA, per-module patterns) is said.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.errors import FormatError, IncompatibleAdapterError

HELP = "export an adapter to GGUF (llama.cpp, Ollama), a merged GGUF model, or a flat PEFT adapter"
_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="PEFT-format adapter folder")
    parser.add_argument("--to", required=True, choices=("gguf", "peft"), help="gguf (llama.cpp, Ollama) or peft (flat)")
    parser.add_argument("--out", required=True, help="the .gguf file (--to gguf) or folder (--to peft) to write")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"), help="adapter tensors")
    parser.add_argument("--merged", action="store_true", help="write the base GGUF with the adapter merged into it")
    parser.add_argument("--quant", default="f16", choices=_QUANTS, help="--merged: type of the changed tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from lorakit.export import read_adapter_files

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FormatError(f"--out {str(out)!r} already exists; pass --overwrite or pick another path")
    if args.merged and args.to != "gguf":
        raise FormatError("--merged is a GGUF model file: use it with --to gguf")
    files = read_adapter_files(args.adapter)
    if args.to == "peft":
        return _flat(args, files, out)
    return _gguf(args, files, out)


def _checked(args: argparse.Namespace, files, runtime: str, base) -> None:
    """Runs the runtime check; prints what is handled, refuses what the runtime would not serve."""
    from lorakit.export import adapter_facts
    from lorakit.runtimes import BLOCKING, check

    findings = check(adapter_facts(files, base, args.adapter), runtime)
    blocking = [f for f in findings if f.rule.severity in BLOCKING]
    if blocking:
        raise IncompatibleAdapterError(
            f"{runtime} cannot serve {args.adapter}: "
            + " ".join(f.line() for f in blocking)
            + f" (see `lorakit check {args.adapter} --for {runtime}`)"
        )
    for finding in findings:
        print(finding.line())


def _gguf(args: argparse.Namespace, files, out: Path) -> int:
    from lorakit.export import export_gguf_adapter, export_gguf_merged, resolve_base

    base = resolve_base(files, args.model)
    _checked(args, files, "llama.cpp", base)
    if args.merged:
        report = export_gguf_merged(files, base, out, args.quant)
        print(
            f"merged {args.adapter} into {base.gguf_path.name}: {len(report.changed)} tensors changed "
            f"({args.quant}), {report.copied} copied unchanged -> {out}"
        )
        return 0
    report = export_gguf_adapter(files, base, out, args.outtype)
    folded = f"; scale folded into B for {len(report.folded)} modules" if report.folded else ""
    fallback = (
        f"; {len(report.f16_fallback)} tensors written f16 (rows not a block multiple)" if report.f16_fallback else ""
    )
    print(f"wrote {report.tensors} tensors ({args.outtype}, arch {base.arch}){folded}{fallback} -> {out}")
    print(f"run it: llama-cli -m BASE.gguf --lora {out}   (Ollama: ADAPTER {out} in a Modelfile)")
    return 0


def _flat(args: argparse.Namespace, files, out: Path) -> int:
    from lorakit.export import export_flat_peft

    if out.exists() and not out.is_dir():
        raise FormatError(f"--out {str(out)!r} is a file; --to peft writes an adapter folder")
    export_flat_peft(files, out)
    print(f"wrote a flat PEFT adapter (r={files.max_rank}, lora_alpha={files.max_rank}, scales in B) -> {out}")
    return 0
