"""``lorakit info MODEL``: modules, what a LoRA config would target, and parameter counts."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from torch import nn

from lorakit.cli.options import MODEL_HELP, add_lora_args, add_model_args, lora_config_from_args, model_kwargs
from lorakit.inject import candidate_modules, find_targets
from lorakit.layers import supports_lora

HELP = "show a model's modules, what a LoRA config would target, and parameter counts"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    add_model_args(parser)
    add_lora_args(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def describe(model: nn.Module, config) -> dict:
    """Module inventory and the parameter cost of ``config`` on ``model`` (the model is not changed)."""
    targets = find_targets(model, config)
    groups: dict[str, dict] = {}
    for name, module in candidate_modules(model):
        if not supports_lora(module) or not hasattr(module, "weight"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        g = groups.setdefault(
            leaf,
            {"type": type(module).__name__, "shape": list(module.weight.shape), "count": 0, "targeted": 0},
        )
        g["count"] += 1
        g["targeted"] += name in targets
    lora_params = 0
    for name in targets:
        module = model.get_submodule(name)
        rows, cols = module.weight.shape[0], module.weight[0].numel()
        r = config.rank_for(name)
        lora_params += r * (rows + cols)
    total = sum(p.numel() for p in model.parameters())
    return {
        "model": type(model).__name__,
        "parameters": total,
        "modules": groups,
        "types": dict(Counter(type(m).__name__ for _, m in candidate_modules(model))),
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in targets}),
        "targeted": len(targets),
        "lora_parameters": lora_params,
        "lora_percent": 100 * lora_params / max(total + lora_params, 1),
        "adapter_megabytes_fp32": lora_params * 4 / 1e6,
    }


def run(args: argparse.Namespace) -> int:
    from lorakit.models import load_model

    config = lora_config_from_args(args)  # bad flags fail before the model loads
    model, _ = load_model(args.model, **model_kwargs(args))
    report = describe(model, config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}: {report['model']}, {report['parameters']:,d} parameters")
    print(f"{'module':<20} {'type':<12} {'weight shape':<16} {'count':>6} {'targeted':>9}")
    for leaf, g in report["modules"].items():
        print(f"{leaf:<20} {g['type']:<12} {str(tuple(g['shape'])):<16} {g['count']:>6} {g['targeted']:>9}")
    print(
        f"LoRA r={config.r} alpha={config.lora_alpha:g} on {report['target_modules']}: {report['targeted']} modules, "
        f"{report['lora_parameters']:,d} trainable parameters ({report['lora_percent']:.3f}%), "
        f"adapter ~{report['adapter_megabytes_fp32']:.2f} MB in fp32"
    )
    return 0
