"""Tiny random causal LMs of the families people fine-tune, for the architecture matrix (seconds each on a CPU).

Each entry: README name -> (transformers config class, model class, config overrides). Every model is 2 layers,
hidden 32, vocabulary 64, so a forward pass costs milliseconds.
"""

from __future__ import annotations

import torch
from torch import nn

_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}  # fmt: skip
_MOE = {"num_local_experts": 4, "num_experts_per_tok": 2}

FAMILIES: dict[str, tuple[str, str, dict]] = {
    "Llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "Mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE),
    "Qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "Gemma 2": ("Gemma2Config", "Gemma2ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "Gemma 3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 8}),
    "Phi-3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "pad_token_id": 0}),
    "GPT-2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64, "n_positions": 64},
    ),  # fmt: skip
    "GPT-NeoX": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 64,
        },
    ),  # fmt: skip
    "Falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 64},
    ),  # fmt: skip
    "OPT": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": 32,
            "ffn_dim": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 64,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 64,
        },
    ),  # fmt: skip
    "OLMo 2": ("Olmo2Config", "Olmo2ForCausalLM", _LLAMA_LIKE),
    "Mixtral (MoE)": ("MixtralConfig", "MixtralForCausalLM", {**_LLAMA_LIKE, **_MOE}),
    "Qwen2-MoE (MoE)": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **_LLAMA_LIKE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
        },
    ),  # fmt: skip
    "OLMoE (MoE)": ("OlmoeConfig", "OlmoeForCausalLM", {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2}),
}


def build(family: str, seed: int = 0) -> nn.Module:
    """The tiny random model of ``family`` (seeded, fp32, eval mode)."""
    import transformers

    config_name, model_name, overrides = FAMILIES[family]
    config = getattr(transformers, config_name)(
        **{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **overrides}
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()
