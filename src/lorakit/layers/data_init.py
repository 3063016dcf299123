"""PiSSA / OLoRA initialisation of a LoRA linear layer: factors from its base weight, the base keeps the residual.

The math is in `lorakit.ops.inits`; this module reads the base weight (dequantized for a 4-bit base), writes the
factors and the residual (re-quantized for an `NF4Linear` base, as PEFT does for bitsandbytes' 4-bit layers),
and remembers the initial factors so the trained adapter can later be saved as a plain LoRA adapter of the
original base (`lorakit.save_adapter(..., convert_to_lora=True)`).
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError
from lorakit.ops.inits import olora_factors, pissa_factors
from lorakit.quant import dequantized_weight, is_quantized

LOFTQ_HINT = (
    "init_lora_weights='loftq' quantizes the base itself: add the adapter to the full-precision model "
    "(not after lorakit.quantize); the adapted Linear layers become NF4 layers holding LoftQ's codes"
)


@torch.no_grad()
def init_from_base(layer, name: str, init: str) -> None:
    """Initialise adapter ``name`` of the `LoraLinear` ``layer`` with PiSSA or OLoRA, in place.

    Raises:
        ConfigError: ``"loftq"`` reached a single layer (it is applied by `lorakit.inject`, which swaps in the
            NF4 base), a base that cannot be rewritten, or ``r`` above the weight's smaller side.
    """
    if init == "loftq":
        raise ConfigError(LOFTQ_HINT)
    base = layer.base_layer
    quantized = is_quantized(base)
    if quantized and not hasattr(base, "requantize_"):
        raise ConfigError(
            f"init_lora_weights={init!r} rewrites the base weight; {type(base).__name__} cannot be rewritten: use "
            "lorakit.quantize(model) (backend 'torch') or initialise before quantizing"
        )
    weight = dequantized_weight(base) if quantized else base.weight
    w = weight.T if layer.fan_in_fan_out else weight  # (out, in)
    r, s = layer.r[name], layer.scaling[name]
    if init == "olora":
        a, b, residual = olora_factors(w, r, s)
    else:
        a, b, residual = pissa_factors(w, r, s, init)
    a_param, b_param = layer.lora_A[name].weight, layer.lora_B[name].weight
    a_param.copy_(a.to(a_param.dtype))
    b_param.copy_(b.to(b_param.dtype))
    residual = residual.T if layer.fan_in_fan_out else residual
    if quantized:
        base.requantize_(residual.to(torch.float32))
    else:
        base.weight.copy_(residual.to(base.weight.dtype))
    layer.initial_factors[name] = (a_param.detach().clone(), b_param.detach().clone())


@torch.no_grad()
def loftq_base(
    module: torch.nn.Module, r: int, loftq_config: dict
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """LoftQ for one full-precision ``nn.Linear``: ``(NF4Linear holding LoftQ's codes, A (r, in), B (out, r))``.

    The NF4 layer uses fp32 block scales (no double quantization), the quantizer LoftQ optimised against, so
    its dequantized weight is exactly LoftQ's ``Q``.
    """
    from lorakit.ops.inits import loftq_factors
    from lorakit.quant import NF4Linear

    if not isinstance(module, torch.nn.Linear) or is_quantized(module):
        raise ConfigError(f"{LOFTQ_HINT}; got a {type(module).__name__} base")
    a, b, q = loftq_factors(
        module.weight, r, num_bits=loftq_config.get("loftq_bits", 4), num_iter=loftq_config.get("loftq_iter", 1)
    )
    nf4 = NF4Linear(q, module.bias, double_quant=False, compute_dtype=module.weight.dtype)
    return nf4.train(module.training), a, b


def as_plain_lora(layers, name: str, state: dict[str, torch.Tensor], config):
    """Adapter ``name`` of a PiSSA/OLoRA run rewritten as a plain LoRA adapter of the *original* base.

    With ``W = W_res + s B0 A0`` (the init) and ``W_res + s B A`` after training, the update relative to ``W`` is
    ``s (B A - B0 A0) = s [B | -B0] [A ; A0]``: rank ``2r``, and alpha doubled (``sqrt(2)`` times with rsLoRA)
    so the scale stays ``s`` (PEFT's ``path_initial_model_for_weight_conversion`` gives the same tensors).

    Args:
        layers: ``(path, layer)`` pairs of the LoRA layers holding ``name``.
        name: The adapter.
        state: Its tensors keyed as `lorakit.adapter_state_dict` keys them (not modified).
        config: Its `LoraConfig`.

    Returns:
        ``(state, config)`` of the plain adapter.
    """
    import dataclasses
    import math

    init = str(config.init_lora_weights)
    if config.use_dora or not (init == "olora" or init.startswith("pissa")):
        raise ConfigError(
            f"convert_to_lora applies to adapters initialised with init_lora_weights='pissa'/'olora' (without DoRA); "
            f"adapter {name!r} has init_lora_weights={config.init_lora_weights!r}, use_dora={config.use_dora}"
        )
    out = dict(state)
    for path, layer in layers:
        if name not in layer.initial_factors:
            raise ConfigError(f"{path}: adapter {name!r} has no recorded initial factors (was it loaded from a file?)")
        a0, b0 = layer.initial_factors[name]
        ka, kb = f"{path}.lora_A.{name}.weight", f"{path}.lora_B.{name}.weight"
        out[ka] = torch.cat([state[ka].detach(), a0.to(state[ka].dtype)], dim=0)  # (2r, in)
        out[kb] = torch.cat([state[kb].detach(), -b0.to(state[kb].dtype)], dim=1)  # (out, 2r)
    factor = math.sqrt(2) if config.use_rslora else 2
    config = dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )
    return out, config
