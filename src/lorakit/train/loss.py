"""Causal-LM loss that only computes logits where there is a label.

With masked prompts most positions carry no loss, yet a plain forward projects every position onto the
whole vocabulary (49k x 576 for SmolLM2: a fifth of the model's FLOPs). Running the decoder, gathering the
labelled positions and applying the output head to those alone gives the same loss for less compute and
memory. Models whose head does more than a projection (logit soft-capping or scaling) use the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.train.data import IGNORE_INDEX


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, head)`` when logits are exactly ``head(decoder(...).last_hidden_state)``, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if get_decoder is None or get_head is None or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    if getattr(config, "model_type", "") not in _PLAIN_HEAD_TYPES:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


# Families whose causal-LM head is a bare projection of the decoder's last hidden state.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox", "olmo", "olmo2", "smollm3"})


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean", split_head: bool = True
) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose (shifted) label is not ``IGNORE_INDEX``.

    Args:
        model: A Hugging Face causal LM (possibly LoRA-wrapped).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each (batch, seq).
        reduction: ``"mean"`` over learned tokens or ``"sum"``.
        split_head: Run the decoder and the head separately when that is exact (see the module docstring);
            False always calls ``model(...)`` (FSDP needs its root module's forward to run).
    """
    labels = batch["labels"][:, 1:]  # (batch, seq-1): token t predicts label t+1
    keep = labels != IGNORE_INDEX
    parts = _split_head(model) if split_head else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])  # (n_learned, vocab)
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), labels[keep], reduction=reduction)
