"""PEFT's on-disk adapter format as pure functions: key names and file names, no disk access.

In memory lorakit uses PEFT's own module layout, so converting is a rename: add the ``base_model.model.``
prefix and drop the adapter name after the factor containers (``q_proj.lora_A.default.weight`` ->
``base_model.model.<path>.q_proj.lora_A.weight``; ``head.modules_to_save.default.weight`` -> ``head.weight``;
DoRA's ``q_proj.lora_magnitude_vector.default`` -> ``...q_proj.lora_magnitude_vector``, PEFT's file key).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
FACTOR_CONTAINERS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"})


def to_peft_key(key: str, name: str) -> str:
    """The PEFT file key for the in-memory key ``key`` of adapter ``name``."""
    parts, out, i = key.split("."), [], 0
    while i < len(parts):
        part = parts[i]
        following = parts[i + 1] if i + 1 < len(parts) else None
        if part in FACTOR_CONTAINERS and following == name:
            out.append(part)
            i += 2
        elif part == "modules_to_save" and following == name:
            i += 2
        else:
            out.append(part)
            i += 1
    return PREFIX + ".".join(out)


def to_peft_state(state: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """Rename a whole in-memory adapter state dict to PEFT's file keys."""
    return {to_peft_key(k, name): t for k, t in state.items()}


def from_peft_state(
    file_state: Mapping[str, Tensor], expected_keys: list[str], name: str, saved_module_paths: list[str]
) -> dict[str, Tensor]:
    """Map PEFT file keys back onto the in-memory keys the model expects for adapter ``name``.

    File keys that match nothing are kept under their own name, so the strict loader reports them. PEFT's
    ``bias="all"`` files also carry duplicate ``modules_to_save.*`` / ``original_module.*`` biases of saved
    modules; those are redundant copies and are dropped.
    """
    wanted = {to_peft_key(k, name): k for k in expected_keys}
    out: dict[str, Tensor] = {}
    for key, tensor in file_state.items():
        if key in wanted:
            out[wanted[key]] = tensor
        elif not _is_saved_module_duplicate(key, saved_module_paths):
            out[key] = tensor
    return out


def _is_saved_module_duplicate(key: str, saved_module_paths: list[str]) -> bool:
    return any(
        key.startswith(f"{PREFIX}{path}.modules_to_save.") or key.startswith(f"{PREFIX}{path}.original_module.")
        for path in saved_module_paths
    )
