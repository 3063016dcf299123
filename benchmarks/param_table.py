"""Trainable parameters and adapter file size on the embedded default model: the README's parameter table.

For r in 8/16/32 on q,k,v,o and on all-linear: the count ``lorakit info`` reports (its ``describe``), the
trainable parameters after ``add_adapter`` (they must agree), and the bytes of the saved fp32
``adapter_model.safetensors``. Deterministic; takes well under a minute once the model cache is filled.

Run: python benchmarks/param_table.py [--out benchmarks/results/param_table.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import ROOT, finish, provenance, write_results  # noqa: E402 - a sibling module

TARGETS = {"q,k,v,o": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"}
RANKS = (8, 16, 32)


def measure(model, targets, r: int, tmp: Path) -> dict:
    """One row: info's count, the injected model's trainable count and the saved file's size."""
    import lorakit
    from lorakit.commands.info import describe

    config = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets)
    info = describe(model, config)
    injected = lorakit.add_adapter(copy.deepcopy(model), config)
    trainable, total = lorakit.trainable_parameters(injected)
    if trainable != info["lora_parameters"]:
        raise SystemExit(f"lorakit info says {info['lora_parameters']:,d} but add_adapter made {trainable:,d}")
    folder = tmp / f"{r}_{len(info['target_modules'])}"
    lorakit.save_adapter(injected, folder)
    return {
        "r": r,
        "trainable_params": trainable,
        "base_params": info["parameters"],
        "all_params": total,
        "percent_of_all": 100 * trainable / total,
        "targeted_modules": info["targeted"],
        "adapter_bytes": (folder / "adapter_model.safetensors").stat().st_size,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "param_table.json"))
    args = p.parse_args()
    from lorakit.models import load_model

    prov = provenance()
    model, _ = load_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, targets in TARGETS.items():
            for r in RANKS:
                rows.append({"targets": label, **measure(model, targets, r, Path(tmp))})
    write_results(args.out, {"provenance": finish(prov), "model": args.model, "rows": rows})
    print("| targets | r | trainable params | % of all params (base + LoRA) | adapter bytes |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['targets']} | {row['r']} | {row['trainable_params']:,d} | {row['percent_of_all']:.3f}% "
            f"| {row['adapter_bytes']:,d} |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
