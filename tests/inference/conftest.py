"""Fixtures of the fast-decode tests: a tiny random Llama carrying three random adapters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

sys.path.insert(0, str(Path(__file__).parent))
from decode_helpers import with_adapters  # noqa: E402


@pytest.fixture
def lora_llama() -> torch.nn.Module:
    """A tiny Llama (vocabulary 128, sharp logits so greedy choices are well separated) with three adapters."""
    model = tiny_llama(max_position_embeddings=128)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return with_adapters(model)
