"""Does llama.cpp run lorakit's GGUF exports like lorakit? Greedy agreement on the main job's held-out prompts.

    python benchmarks/check_gguf_export.py [--adapter runs/orders] [--prompts 100] [--max-new 48] [--threads 1]

Uses the main job's adapter (``runs/orders``, made by ``bash scripts/main_job.sh``) and the embedded default
model's own GGUF file (SmolLM2-135M-Instruct, Q4_1). For each variant it generates greedily with lorakit
(PyTorch, fp32, the adapter unmerged) and with llama.cpp (llama-cpp-python) from identical prompt token ids,
and counts the rows whose generated ids are identical:

- ``adapter``: the base GGUF + ``lorakit export --to gguf`` (f32 and q8_0 factors);
- ``patterned``: the same adapter re-expressed with rsLoRA + rank_pattern + alpha_pattern (tests/export helper),
  exported the same way (the per-module scales are folded into B);
- ``merged``: ``lorakit export --to gguf --merged`` (changed tensors f16 / q8_0), run without --lora;
- controls: the base GGUF alone vs lorakit's base model (should agree) and vs the adapter (should not).

It also records, for the README's exact-unmerge paragraph, how many adapted weights a subtracting unmerge,
``(W + d) - d``, would change (fp32, bf16), and the bytes lorakit's exact unmerge keeps while merged.

Writes benchmarks/results/gguf_export.json (machine and date inside).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "export"))

from export_helpers import chat_prompt_ids, patterned_copy, stop_ids  # noqa: E402

import lorakit  # noqa: E402
from lorakit.export import export_gguf_adapter, export_gguf_merged, read_adapter_files, resolve_base  # noqa: E402
from lorakit.export.agreement import agreement, llama_cpp_greedy, lorakit_greedy  # noqa: E402
from lorakit.models import embedded_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=str(ROOT / "runs" / "orders"))
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_export.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        sys.exit(f"no adapter at {adapter}: run `bash scripts/main_job.sh` first, or pass --adapter DIR")
    start = time.time()
    files = read_adapter_files(adapter)
    base = resolve_base(files)
    # the model the adapter was trained on: lorakit's embedded copy when the config names its Hub id (offline)
    base_name = embedded_name(files.config["base_model_name_or_path"]) or files.config["base_model_name_or_path"]
    model, tokenizer = lorakit.load_model(base_name)
    rows = [json.loads(x) for x in (ROOT / "examples/data/orders_eval.jsonl").read_text().splitlines() if x]
    prompts = [chat_prompt_ids(tokenizer, r["prompt"]) for r in rows[: args.prompts]]
    stops = stop_ids(tokenizer)

    def ours(folder: Path | None) -> list[list[int]]:
        fresh, _ = lorakit.load_model(base_name)
        if folder is not None:
            lorakit.load_adapter(fresh, folder)
        return lorakit_greedy(fresh, prompts, args.max_new, stops)

    def cpp(path: Path, lora: Path | None = None) -> list[list[int]]:
        return llama_cpp_greedy(path, prompts, args.max_new, stops, lora, threads=args.threads)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        patterned = patterned_copy(adapter, tmp / "patterned")
        expected = {"adapter": ours(adapter), "patterned": ours(patterned), "base": ours(None)}
        base_cpp = cpp(base.gguf_path)
        results["control: base GGUF alone vs lorakit base"] = _row(base_cpp, expected["base"])
        results["control: base GGUF alone vs lorakit + adapter"] = _row(base_cpp, expected["adapter"])
        for variant, folder in (("adapter", adapter), ("patterned", patterned)):
            variant_files = read_adapter_files(folder)
            for outtype in ("f32", "q8_0"):
                out = tmp / f"{variant}-{outtype}.gguf"
                export_gguf_adapter(variant_files, base, out, outtype)
                got = cpp(base.gguf_path, out)
                results[f"{variant}: base GGUF + --lora ({outtype})"] = _row(got, expected[variant])
            for quant in ("f16", "q8_0"):
                out = tmp / f"{variant}-merged-{quant}.gguf"
                export_gguf_merged(variant_files, base, out, quant)
                results[f"{variant}: merged GGUF ({quant})"] = _row(cpp(out), expected[variant])
        results["control: lorakit + adapter vs lorakit base"] = _row(expected["adapter"], expected["base"])
    report_unmerge = unmerge_figures(base_name, adapter)
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": _commit(),
        "threads": args.threads,
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "llama_cpp_python": _version("llama-cpp-python"),
        "adapter": str(adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter),
        "base_gguf": base.gguf_path.name,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new,
        "agreement": results,
        "unmerge": report_unmerge,
        "wall_s": round(time.time() - start, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, row in results.items():
        print(f"{name:55s} {row['identical']:4d}/{row['rows']} rows identical ({100 * row['fraction']:.1f}%)")
    print(f"wrote {args.out}")


def unmerge_figures(model_name: str, adapter: Path) -> dict:
    """Share of adapted weights that ``(W + d) - d`` changes, and the copy exact unmerge keeps, per dtype."""
    from lorakit.layers import iter_lora_layers

    out = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, _ = lorakit.load_model(model_name, dtype=dtype)
        lorakit.load_adapter(model, adapter)
        changed = total = 0
        for _, layer in iter_lora_layers(model):
            weight = layer.base_layer.weight.detach()
            delta = layer.delta_weight("default").to(dtype)
            changed += int(((weight + delta) - delta != weight).sum())
            total += weight.numel()
        lorakit.merge(model)
        kept = sum(layer.weight_before_merge.nbytes for _, layer in iter_lora_layers(model))
        lorakit.unmerge(model)
        out[label] = {"adapted_weights": total, "changed_by_subtracting": round(changed / total, 4), "kept_bytes": kept}
    return out


def _row(a: list[list[int]], b: list[list[int]]) -> dict:
    found = agreement(a, b)
    return {"rows": found.rows, "identical": found.identical, "fraction": round(found.fraction, 4)}


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
