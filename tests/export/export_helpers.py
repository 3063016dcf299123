"""Hand-made adapter folders (PEFT format) for the export and runtime-check tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.export import BaseInfo
from lorakit.io.checkpoint import write_adapter_dir

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTN = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
MLP = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def tiny_llama_base(n_layer: int = 2, tensor_names: frozenset[str] | None = None) -> BaseInfo:
    """The GGUF facts of a 2-layer Llama (4 heads, 2 KV heads), tied output head, no GGUF file."""
    return BaseInfo("llama", n_layer, 4, 2, tensor_names, tied_output=True)


def module_path(leaf: str, layer: int) -> str:
    if leaf in ("embed_tokens",):
        return "model.embed_tokens"
    if leaf == "lm_head":
        return "lm_head"
    return f"model.layers.{layer}.{ATTN.get(leaf) or MLP.get(leaf, 'self_attn')}.{leaf}"


def write_adapter(
    folder: Path,
    targets: tuple[str, ...] = LLAMA_MODULES,
    r: int = 4,
    layers: tuple[int, ...] = (0, 1),
    ranks: dict[str, int] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    **config,
) -> Path:
    """Writes a PEFT-format adapter with random factors (hidden 32, KV width 16) and returns its folder."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = dict(extra or {})
    width = {"k_proj": 16, "v_proj": 16, "gate_proj": 64, "up_proj": 64}
    for leaf in targets:
        for layer in layers if leaf not in ("embed_tokens", "lm_head") else (0,):
            path = module_path(leaf, layer)
            rank = (ranks or {}).get(leaf, r)
            out, inp = width.get(leaf, 32), 64 if leaf == "down_proj" else 32
            key = f"base_model.model.{path}"
            if leaf == "embed_tokens":
                tensors[f"{key}.lora_embedding_A"] = torch.randn(rank, 128, generator=gen)
                tensors[f"{key}.lora_embedding_B"] = torch.randn(32, rank, generator=gen)
                continue
            out = 128 if leaf == "lm_head" else out
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets), "bias": "none"}
    cfg.update({"base_model_name_or_path": "tiny-llama", **config})
    write_adapter_dir(folder, cfg, tensors)
    return folder
