"""The decoder math of Llama-family models (Llama, SmolLM2, Mistral without sliding window, Qwen2) on packed weights.

Same operations as transformers' Llama code (RMSNorm in fp32, rotary tables from the model's own
``rotary_emb``, grouped-query SDPA, SiLU-gated MLP), with q/k/v and gate/up each fused into one matmul and each
projection's adapters applied by `lorakit.inference.adapters`. The model itself is only read: its LoRA layers
stay where they are and keep training/saving as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.inference.adapters import ProjectionAdapters
from lorakit.inference.weights import PackedWeight
from lorakit.layers.base import LoraLayer, iter_lora_layers

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
FUSED = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}  # fmt: skip


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast path cannot run ``model`` (None: it can). Callers fall back to ``model.generate``."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        return f"model_type {kind!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None) and kind == "mistral":
        return "sliding-window attention"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(layers[0].self_attn, "q_norm", None) is not None:
        return "not the Llama layer layout"
    allowed = {f"model.layers.{i}.{p}" for i in range(len(layers)) for ps in FUSED.values() for p in ps}
    for path, layer in iter_lora_layers(model):
        if path not in allowed or not hasattr(layer, "factors"):
            return f"LoRA layer {path} ({type(layer).__name__}) is not a projection the fast path applies"
        dora = [n for n in layer.r if getattr(layer, "is_dora", lambda _: False)(n)]
        if dora:
            return f"DoRA adapter {dora[0]!r} on {path} (the fast path applies plain LoRA updates only)"
    for path, module in model.named_modules():
        if type(module).__name__ == "ModulesToSave":
            return f"modules_to_save at {path}"
    return None


def base_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The frozen ``(out, in)`` weight and bias of a projection (through a LoRA wrapper, dequantizing NF4)."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    weight = base.dequantized_weight() if hasattr(base, "dequantized_weight") else base.weight
    return weight, getattr(base, "bias", None)


def weight_versions(modules: Sequence[nn.Module]) -> tuple:
    """Identity and version counter of each projection's base weight (changed by merge/unmerge/requantize)."""
    weights = [(m.base_layer if isinstance(m, LoraLayer) else m) for m in modules]
    return tuple((id(w), w.weight._version) if hasattr(w, "weight") else (id(w), 0) for w in weights)


def fuse(modules: Sequence[nn.Module], fmt: str) -> PackedWeight:
    """One packed weight for projections that read the same input (their outputs side by side)."""
    pairs = [base_weight(m) for m in modules]
    weight = pairs[0][0] if len(pairs) == 1 else torch.cat([w.float() for w, _ in pairs])
    biases = [b for _, b in pairs]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for (w, _), b in zip(pairs, biases)])
    return PackedWeight(weight, bias, fmt)


@dataclass
class Block:
    """One decoder layer's packed weights and, for the current batch, its projections' adapters."""

    path: str
    ln1: Tensor
    ln2: Tensor
    proj: dict[str, PackedWeight]
    versions: dict[str, tuple]  # the source weights' version counters when packed (a merge bumps them)
    adapters: dict[str, ProjectionAdapters]
    masks: dict[str, Tensor | None]

    def linear(self, key: str, x: Tensor) -> Tensor:
        """Fused projection ``key`` of ``x (n, in)`` plus each row's adapter update."""
        return self.adapters[key].add_to(self.proj[key](x), x, self.masks[key])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as transformers' LlamaRMSNorm computes it: normalize in fp32, then scale."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def signed_sin(sin: Tensor) -> Tensor:
    """``sin`` with its first half negated: what `rotate` multiplies the half-swapped input by."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotary embedding ``x cos + rotate_half(x) sin`` (``x (n, heads, S, D)``, tables ``(n, 1, S, D)``).

    ``rotate_half(x) sin = cat(-x2, x1) * cat(s1, s2) = cat(x2, x1) * cat(-s1, s2)`` exactly (a sign flip rounds
    nothing), so the half swap is one ``roll`` and the negation sits in the precomputed table (`signed_sin`).
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


@dataclass(frozen=True)
class Dims:
    """Head layout and norm epsilon of a model."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float

    @staticmethod
    def of(model: nn.Module) -> Dims:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return Dims(c.num_attention_heads, c.num_key_value_heads, head_dim, c.rms_norm_eps)


def attention_inputs(block: Block, dims: Dims, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q (n, H, S, D)``, ``k, v (n, Hkv, S, D)`` of ``h (n, S, hidden)``, rotary embedding applied.

    ``sin`` is the signed table (`signed_sin`); q and k are rotated together, as one tensor of ``H + Hkv`` heads.
    """
    n, s, _ = h.shape
    qkv = block.linear("qkv", h.reshape(n * s, -1))  # (n*S, (H + 2 Hkv) D)
    heads = dims.heads + dims.kv_heads
    qk, v = qkv.split([heads * dims.head_dim, dims.kv_heads * dims.head_dim], dim=-1)
    qk = rotate(qk.reshape(n, s, heads, dims.head_dim).transpose(1, 2), cos, sin)  # (n, H + Hkv, S, D)
    v = v.reshape(n, s, dims.kv_heads, dims.head_dim).transpose(1, 2)
    return qk[:, : dims.heads], qk[:, dims.heads :], v


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """Grouped-query scaled dot-product attention; returns ``(n, S, H * D)``."""
    grouped = k.shape[1] != q.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=grouped)
    n, _, s, _ = out.shape
    return out.transpose(1, 2).reshape(n, s, -1)


def mlp(block: Block, x: Tensor) -> Tensor:
    """``down(silu(gate(x)) * up(x))`` for ``x (n, hidden)``."""
    gate, up = block.linear("gate_up", x).chunk(2, dim=-1)
    return block.linear("down", F.silu(gate) * up)
