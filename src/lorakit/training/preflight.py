"""Pre-flight checks: catch the silent failures of LoRA training before minutes are spent on them.

1. What was targeted (module kinds and counts, trainable parameters), so a wrong ``target_modules`` shows.
2. A save/load round-trip of the fresh adapter through the PEFT format, so an adapter that would not reload
   is found before training, not after.
3. After the first backward: every ``lora_B`` has a finite, non-zero gradient. With B = 0 at init only B
   gets gradient at step 1, and a graph cut (e.g. reentrant gradient checkpointing with frozen inputs) leaves
   it at None, which otherwise trains nothing while the loss looks plausible.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter

import torch

from lorakit.errors import LorakitError

logger = logging.getLogger(__name__)


class PreflightError(LorakitError):
    """A pre-flight check failed; training would not have learned anything (or not been reloadable)."""


def targets_summary(model: torch.nn.Module, name: str) -> str:
    """One line: which module kinds got the adapter, how many, and the trainable share."""
    from lorakit import trainable_parameters
    from lorakit.layers import iter_lora_layers

    kinds = Counter(path.rsplit(".", 1)[-1] for path, layer in iter_lora_layers(model) if name in layer.r)
    trainable, total = trainable_parameters(model)
    listing = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
    return (
        f"LoRA on {sum(kinds.values())} modules ({listing}); trainable params {trainable:,d} of {total:,d} "
        f"({100 * trainable / max(total, 1):.3f}%)"
    )


def check_round_trip(model: torch.nn.Module, name: str) -> None:
    """Save adapter ``name`` in PEFT format, load it back under a scratch name and compare every tensor.

    Raises:
        PreflightError: A tensor differs or is missing after the round-trip.
    """
    from lorakit import delete_adapter, load_adapter, save_adapter
    from lorakit.state import adapter_state_dict

    scratch = "lorakit_preflight"
    with tempfile.TemporaryDirectory(prefix="lorakit-preflight-") as tmp:
        save_adapter(model, tmp, name)
        load_adapter(model, tmp, name=scratch, trainable=False)
    try:
        ours = adapter_state_dict(model, name)
        back = adapter_state_dict(model, scratch)
        bad = []
        for key, t in ours.items():
            # the adapter name sits mid-key (lora_A.<name>.weight) or last (DoRA's lora_magnitude_vector.<name>)
            other = back.get(re.sub(rf"\.{re.escape(name)}(\.|$)", rf".{scratch}\1", key, count=1))
            if other is None or other.shape != t.shape or not torch.equal(other.to(t.dtype), t):
                bad.append(key)
    finally:
        delete_adapter(model, scratch)
    if bad:
        raise PreflightError(
            f"adapter {name!r} does not survive a save/load round-trip: {len(bad)} of {len(ours)} tensors differ "
            f"(e.g. {bad[:3]}); this is a lorakit bug, please report it."
        )


def check_gradients(model: torch.nn.Module, name: str) -> None:
    """After the first backward: every ``lora_B`` of adapter ``name`` has a finite, non-zero gradient.

    Raises:
        PreflightError: Some ``lora_B`` got no (or a zero) gradient; names them and the usual cause.
    """
    from lorakit.layers import iter_lora_layers

    missing, zero, total = [], [], 0
    for path, layer in iter_lora_layers(model):
        if name not in layer.r:
            continue
        total += 1
        grad = layer.lora_B[name].weight.grad
        if grad is not None and hasattr(grad, "full_tensor"):  # an FSDP2 shard: every rank gathers it
            grad = grad.full_tensor()
        if grad is None:
            missing.append(path)
        elif not bool(torch.isfinite(grad).all()) or float(grad.abs().sum()) == 0.0:
            zero.append(path)
    if missing or zero:
        raise PreflightError(
            f"after the first backward {len(missing)} of {total} lora_B weights got no gradient and {len(zero)} a "
            f"zero or non-finite one (e.g. {(missing + zero)[:3]}); the adapter would not learn there. With "
            "--gradient-checkpointing this is the known reentrant-checkpoint failure (lorakit uses the non-reentrant "
            "kind; check custom model code); otherwise check that those modules are on the loss path."
        )
    logger.info("pre-flight: gradients reach all %d lora_B weights", total)
