"""What ``target_modules=None`` means: PEFT's per-architecture default, keyed by ``config.model_type``.

The one source of the default targets for `add_adapter`, ``lorakit train``, ``lorakit info`` and
``lorakit sweep``. The facts are PEFT's (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` in peft 0.21):
for Llama that is ``q_proj`` and ``v_proj`` only. Architectures PEFT has no default for (Phi-3, OLMo 2, the
mixture-of-experts families, any non-transformers module) get none here either: PEFT refuses them and so do
we, with a message that names the choices. The table is ours; ``tests/test_default_targets.py`` checks it
against the installed PEFT.
"""

from __future__ import annotations

from torch import nn

__all__ = ["DEFAULT_TARGETS_BY_MODEL_TYPE", "default_targets", "model_type"]

_QV = ("q_proj", "v_proj")
_FUSED_QKV = ("query_key_value",)
_QV_TYPES = ("llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt")
_QV_TYPES += ("gptj", "gpt_neo", "stablelm")
# model_type -> default target_modules (a tuple of names, or one full-match regex string)
DEFAULT_TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...] | str] = {
    # decoder-only language models
    **dict.fromkeys(_QV_TYPES, _QV),
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "btlm": ("c_proj", "c_attn"),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom", "chatglm", "RefinedWeb", "RefinedWebModel"), _FUSED_QKV),
    "mpt": ("Wqkv",),
    "codegen": ("qkv_proj",),
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
    # encoders and encoder-decoders
    **dict.fromkeys(("t5", "mt5"), ("q", "v")),
    "bart": _QV,
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "layoutlm"), ("query", "value")),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` of a transformers model, None for anything else."""
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) and value else None


def default_targets(model: nn.Module) -> tuple[str, ...] | str | None:
    """PEFT's default ``target_modules`` for ``model``'s architecture, or None when PEFT has none."""
    kind = model_type(model)
    return None if kind is None else DEFAULT_TARGETS_BY_MODEL_TYPE.get(kind)


def no_default_message(model: nn.Module, adaptable: list[str]) -> str:
    """Why ``target_modules=None`` cannot be resolved for ``model``, and what to pass instead."""
    kind = model_type(model)
    what = f"model_type {kind!r}" if kind else f"{type(model).__name__} (not a transformers model)"
    return (
        f"target_modules=None means the architecture's default (PEFT's table), but {what} has none, as in PEFT. "
        f"Pass target_modules: module names such as {adaptable[:8]}, or 'all-linear' (every linear layer but the "
        f"output head)."
    )
