"""Merge LoRA adapters trained on a 4-bit base (QLoRA) into a model you can ship, and measure what changed.

A 4-bit base cannot take ``W + BA`` in place. Three ways out (`merge_quantized`'s ``mode``):

- ``"dequant"`` (default): each 4-bit layer becomes a dense ``nn.Linear`` holding ``dequant(W) + BA``: exactly
  the function the adapter was trained on, up to the dtype you choose.
- ``"nf4"``: ``dequant(W) + BA`` quantized again to NF4; small, but the update is rounded to the NF4 grid,
  and outputs move.
- ``"original"``: ``BA`` added to the original high-precision model (``merge_into=``). The quantized model is
  left as it is; the drift then also shows how far the 4-bit base was from the original.

Every mode reports the drift against the unmerged quantized model on a probe batch: max |delta logit| and
top-1 agreement, so the change is seen before anything is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lorakit.adapters import active_adapters, list_adapters
from lorakit.errors import ConfigError, MergeError
from lorakit.inject import set_submodule
from lorakit.layers import LoraLayer, LoraQuantLinear, ModulesToSave, dora, iter_lora_layers
from lorakit.merging import disabled, unload
from lorakit.quant import NF4Linear, compute_dtype_of, dequantized_weight, is_bnb_4bit, is_quantized
from lorakit.quant.bnb import to_bnb_linear4bit

MODES = ("dequant", "nf4", "original")


@dataclass(frozen=True)
class QuantMergeReport:
    """What a `merge_quantized` call did and how far the merged model's outputs moved.

    Attributes:
        mode: "dequant", "nf4" or "original".
        adapters: The merged (active) adapters.
        layers: How many 4-bit layers carried an update.
        max_abs_logit_delta: max |logits(merged) - logits(unmerged quantized model)| over the probe.
        top1_agreement: Fraction of probe positions whose argmax token is the same in both.
        probe_tokens: Positions in the probe batch.
        adapter_max_abs_logit: max |logits with - without the adapters| on the unmerged 4-bit model: the scale
            to judge the drift by (a drift as large as this means the merge lost most of the adapter).
    """

    mode: str
    adapters: tuple[str, ...]
    layers: int
    max_abs_logit_delta: float
    top1_agreement: float
    probe_tokens: int
    adapter_max_abs_logit: float

    def summary(self) -> str:
        """One line for humans."""
        return (
            f"merged {list(self.adapters)} ({self.layers} 4-bit layers, mode={self.mode}): max |delta logit| "
            f"{self.max_abs_logit_delta:.3e}, top-1 agreement {100 * self.top1_agreement:.2f}% over "
            f"{self.probe_tokens} probe tokens (vs the unmerged 4-bit model, whose adapters move logits by up to "
            f"{self.adapter_max_abs_logit:.3e})"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "adapters": list(self.adapters)}


def default_probe(model: nn.Module, batch: int = 4, length: int = 32, seed: int = 0) -> Tensor:
    """A fixed batch of random token ids ``(batch, length)`` within the model's vocabulary."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None:
        raise ConfigError(f"{type(model).__name__} has no get_input_embeddings(); pass probe=<LongTensor of ids>")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


@torch.no_grad()
def _logits(model: nn.Module, probe: Tensor) -> Tensor:
    training = model.training
    model.eval()  # no dropout in the comparison
    try:
        out = model(probe.to(_device(model)))
    finally:
        model.train(training)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _with_adapters(layer: LoraLayer, names: list[str], weight: Tensor) -> Tensor:
    """``weight`` (fp32) with each adapter merged in turn: ``+ s B A``, or DoRA's ``g * (W + s B A)``.

    DoRA's norm is of the weight without adapters (as in the forward pass and PEFT's merge).
    """
    base = weight
    for n in names:
        if n not in layer.r:
            continue
        if layer.is_dora(n):
            weight = dora.merged_weight(layer, n, weight, base)[0]
        else:
            weight = weight + layer.delta_weight(n).to(weight.device)
    return weight


def _merged_dense(layer: LoraQuantLinear, names: list[str]) -> Tensor:
    weight = dequantized_weight(layer.base_layer, torch.float32)  # (out, in)
    merged = _with_adapters(layer, names, weight)
    if not torch.isfinite(merged).all():
        raise MergeError(f"the merged weight has non-finite values ({names} on {layer.base_layer!r}); nothing merged")
    return merged


def _dense_linear(base: nn.Module, weight: Tensor, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype)
    linear = linear.to(weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    linear.requires_grad_(False)
    return linear.train(base.training)


def _requantized(base: nn.Module, weight: Tensor) -> nn.Module:
    dense = _dense_linear(base, weight, torch.float32)
    if is_bnb_4bit(base):
        return to_bnb_linear4bit(dense, double_quant=base.weight.quant_state.nested, compute_dtype=base.compute_dtype)
    return NF4Linear.from_linear(dense, double_quant=base.double_quant, compute_dtype=base.compute_dtype).train(
        base.training
    )


def _replace_quantized(model: nn.Module, names: list[str], mode: str, dtype: torch.dtype | None) -> int:
    """Swap every 4-bit layer (wrapped or not) for its merged dense or re-quantized version; all or nothing."""
    new: dict[str, nn.Module] = {}
    layers = 0
    for path, module in model.named_modules():
        if isinstance(module, LoraQuantLinear):
            base, weight = module.base_layer, _merged_dense(module, names)
            layers += any(n in module.r for n in names)
        elif is_quantized(module) and mode == "dequant" and not _inside_wrapper(model, path):
            base, weight = module, dequantized_weight(module, torch.float32)
        else:
            continue
        if mode == "nf4":
            new[path] = _requantized(base, weight)
        else:
            new[path] = _dense_linear(base, weight, dtype or compute_dtype_of(base))
    for path, module in new.items():
        set_submodule(model, path, module)
    return layers


def _inside_wrapper(model: nn.Module, path: str) -> bool:
    return path.endswith(".base_layer") and isinstance(model.get_submodule(path.rpartition(".")[0]), LoraLayer)


def _layer_shape(layer: LoraLayer) -> tuple[int, ...]:
    if isinstance(layer, LoraQuantLinear):
        return (layer.out_features, layer.in_features)
    return tuple(layer.base_layer.weight.shape)


def _check_original(model: nn.Module, original: nn.Module, names: list[str]) -> list[tuple[LoraLayer, nn.Module]]:
    """Pair each adapted layer with the same path in ``original``; every mismatch in one `MergeError`."""
    pairs, problems = [], []
    for path, layer in iter_lora_layers(model):
        if not any(n in layer.r for n in names):
            continue
        try:
            target = original.get_submodule(path)
        except AttributeError:
            problems.append(f"{path}: missing in the original model")
            continue
        weight = getattr(target, "weight", None)
        want = _layer_shape(layer)
        if not isinstance(weight, Tensor) or is_quantized(target) or tuple(weight.shape) != want:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else None
            problems.append(f"{path}: original {type(target).__name__} weight {shape}, adapter expects {want}")
            continue
        pairs.append((layer, target))
    if problems:
        raise MergeError(
            f"merge_into does not fit the adapted model ({len(problems)} layer(s)): "
            + "; ".join(problems[:8])
            + ". Pass the high-precision checkpoint the 4-bit model was quantized from (same architecture and size)"
        )
    return pairs


@torch.no_grad()
def _merge_into_original(model: nn.Module, original: nn.Module, names: list[str]) -> int:
    pairs = _check_original(model, original, names)
    deltas = [(target.weight, _with_adapters(layer, names, target.weight.float()) - target.weight.float())
              for layer, target in pairs]  # fmt: skip
    bad = [i for i, (_, d) in enumerate(deltas) if not torch.isfinite(d).all()]
    if bad:
        raise MergeError(f"adapter {names} has non-finite values on {len(bad)} layer(s); nothing was merged")
    for weight, delta in deltas:
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
    for path, module in model.named_modules():  # trained copies of modules_to_save replace the original's
        if isinstance(module, ModulesToSave) and any(n in module.adapter_names for n in names):
            original.get_submodule(path).load_state_dict(module.current().state_dict())
    return sum(isinstance(layer, LoraQuantLinear) for layer, _ in pairs)


def merge_quantized(
    model: nn.Module,
    mode: str = "dequant",
    *,
    merge_into: nn.Module | None = None,
    probe: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, QuantMergeReport]:
    """Merge the active adapters of a model with a 4-bit base, and measure the drift on a probe batch.

    Args:
        model: A model prepared with `lorakit.quantize` (or loaded 4-bit by bitsandbytes) plus active adapters.
        mode: "dequant" (dense ``dequant(W) + BA``, default), "nf4" (re-quantized) or "original" (``BA``
            added to ``merge_into``).
        merge_into: The original high-precision model (same architecture); required for mode "original",
            where it is changed in place and returned, and ``model`` is left unchanged.
        probe: Token ids ``(batch, seq)`` for the drift measurement; default `default_probe`.
        dtype: dtype of the dense layers in mode "dequant" (default: each layer's compute dtype); when given,
            the whole model is cast to it.

    Returns:
        ``(merged_model, report)``. For "dequant"/"nf4" the merged model is ``model`` itself, now without
        adapters (like ``unload(model, merge=True)``).

    Raises:
        ConfigError: unknown mode, or "original" without ``merge_into``.
        MergeError: ``merge_into`` differs in shape (the message names the layers), or non-finite updates.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a quantized merge mode; use one of {list(MODES)}")
    if (mode == "original") != (merge_into is not None):
        raise ConfigError(
            "mode='original' needs merge_into=<the original high-precision model>"
            if mode == "original"
            else f"merge_into is only used with mode='original' (got mode={mode!r})"
        )
    names = active_adapters(model)
    probe = default_probe(model) if probe is None else probe
    reference = _logits(model, probe)
    with disabled(model):
        adapter_effect = (reference - _logits(model, probe)).abs().max().item()
    if mode == "original":
        layers = _merge_into_original(model, merge_into, names)
        merged = merge_into
    else:
        layers = _replace_quantized(model, names, mode, dtype)
        merged = unload(model, merge=True) if list_adapters(model) else model  # the non-4-bit LoRA layers
        if dtype is not None and mode == "dequant":
            merged.to(dtype)
    after = _logits(merged, probe)
    report = QuantMergeReport(
        mode=mode,
        adapters=tuple(names),
        layers=layers,
        max_abs_logit_delta=(after - reference).abs().max().item(),
        top1_agreement=(after.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        probe_tokens=probe.numel(),
        adapter_max_abs_logit=adapter_effect,
    )
    return merged, report
