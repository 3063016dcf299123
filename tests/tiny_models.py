"""Tiny random Hugging Face models for fast CPU tests (seeded, eval mode)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer LlamaForCausalLM: hidden 32, 4 heads (2 KV heads), vocabulary 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 128,
            **overrides,
        }
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT2LMHeadModel (its projections are transformers' Conv1D): n_embd 32, vocabulary 128."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()
