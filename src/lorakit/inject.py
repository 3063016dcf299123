"""The only code that replaces modules: find which modules a config targets, wrap them, unwrap them again.

Matching follows PEFT so that configs mean the same thing in both: a list item matches a module whose dotted
name equals it or ends with ``"." + item``; a string is a regex that must match the whole name.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable

import torch
from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig, TargetSpec
from lorakit.default_targets import default_targets, no_default_message
from lorakit.errors import ConfigError, TargetNotFoundError
from lorakit.layers import LoraLayer, ModulesToSave, is_linear, supports_lora, wrap
from lorakit.layers.data_init import loftq_base

_LAYER_CONTAINERS = ("layers", "h", "blocks", "layer", "block")


def matches(spec: TargetSpec, name: str) -> bool:
    """PEFT's rule: a string is a full regex match; a list item equals the name or a dotted suffix of it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == item or name.endswith("." + item) for item in spec)


def _layer_index(name: str, patterns: Iterable[str] | None) -> int | None:
    """Index of the first numbered block in ``name`` (e.g. 3 in ``model.layers.3.mlp``), or None."""
    if patterns:
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if found:
                return int(found.group(1))
        return None
    found = re.match(r".*?\.[^.]*\.(\d+)\.", name) or re.match(r"^[^.]*\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules that could be targeted: skips the root and everything inside lorakit's own wrappers."""
    out, inside = [], ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        out.append((name, module))
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside = tuple({*inside, name + "."})
    return out


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head.base_layer if isinstance(head, LoraLayer) else head


def _selected(config: LoraConfig, name: str, module: nn.Module, head: nn.Module | None) -> bool:
    if matches(config.exclude_modules, name) or _in_modules_to_save(config, name):
        return False
    spec = config.target_modules
    if spec == ALL_LINEAR:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not is_linear(base) or base is head:
            return False
    elif not matches(spec, name):
        return False
    if config.layers_to_transform is not None and (spec == ALL_LINEAR or not isinstance(spec, str)):
        return _layer_index(name, config.layers_pattern) in config.layers_to_transform
    return True


def _in_modules_to_save(config: LoraConfig, name: str) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save or ())


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the modules ``config`` adapts in ``model`` (pure: the model is not changed).

    Raises:
        TargetNotFoundError: nothing matched (the message lists similar module names).
        ConfigError: a matched module has a type lorakit cannot adapt.
    """
    head = _output_head(model)
    candidates = candidate_modules(model)
    if config.target_modules is None:  # PEFT's per-architecture default (lorakit.default_targets)
        default = default_targets(model)
        if default is None:
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in candidates if supports_lora(_base(m))})
            raise TargetNotFoundError(no_default_message(model, leaves))
        config = dataclasses.replace(config, target_modules=default)
    elif config.target_modules != ALL_LINEAR:
        _refuse_fused_parameters(model, config)
    found, unsupported = [], []
    for name, module in candidates:
        if not _selected(config, name, module, head):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(parent, nn.MultiheadAttention) or not supports_lora(base):
            unsupported.append(f"{name} ({type(base).__name__})")
        else:
            found.append(name)
    if unsupported:
        raise ConfigError(
            f"target_modules={_show(config.target_modules)} selects modules lorakit cannot adapt: "
            f"{', '.join(unsupported[:8])}; LoRA applies to nn.Linear, nn.Embedding, nn.Conv1d/2d/3d and "
            "transformers' Conv1D. Name leaf modules (e.g. 'q_proj') or use exclude_modules."
        )
    if not found:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in candidates if supports_lora(m)})
        wanted = config.target_modules if isinstance(config.target_modules, tuple) else (str(config.target_modules),)
        close = sorted({c for w in wanted for c in difflib.get_close_matches(str(w), leaves, n=3, cutoff=0.5)})
        raise TargetNotFoundError(
            f"target_modules={_show(config.target_modules)} matched no module of {type(model).__name__}"
            + (f" with layers_to_transform={list(config.layers_to_transform)}" if config.layers_to_transform else "")
            + "; a string is a full regex match, a list item matches a module name or dotted suffix. "
            f"Similar names: {close or 'none'}; adaptable leaf names in this model: {leaves[:20]}"
        )
    return found


def _refuse_fused_parameters(model: nn.Module, config: LoraConfig) -> None:
    """A clear error when the targets name parameters, e.g. the fused expert weights of a mixture of experts.

    transformers stores a MoE layer's experts as 3-D parameters (``experts.gate_up_proj``: experts x out x in),
    not as modules; PEFT adapts them with ``target_parameters``, lorakit adapts modules only.
    """
    spec = config.target_modules
    params = [(n, p) for n, p in model.named_parameters() if p.dim() >= 3 and matches(spec, n)]
    if not params:
        return
    name, param = params[0]
    owner = type(model.get_submodule(name.rpartition(".")[0])).__name__
    raise ConfigError(
        f"target_modules={_show(spec)} names parameters, not modules: {name} {tuple(param.shape)} is a fused "
        f"weight of {owner} (one 3-D tensor for all experts; PEFT adapts those with target_parameters). lorakit "
        "adapts modules only: target the attention projections (e.g. ['q_proj', 'v_proj']), 'all-linear' "
        "(the routed experts stay frozen), or the linear layers of a shared expert where the model has one."
    )


def _show(spec: TargetSpec) -> str:
    return repr(list(spec)) if isinstance(spec, tuple) else repr(spec)


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the modules listed in ``config.modules_to_save`` (list rule: name or dotted suffix)."""
    if not config.modules_to_save:
        return []
    found = [n for n, _ in candidate_modules(model) if matches(config.modules_to_save, n)]
    found += [n for n, m in model.named_modules() if isinstance(m, ModulesToSave) and n not in found]
    found = [n for n in found if matches(config.modules_to_save, n)]
    if not found:
        raise TargetNotFoundError(
            f"modules_to_save={list(config.modules_to_save)} matched no module of {type(model).__name__}; "
            "each item must be a module name or a dotted suffix of one (e.g. 'lm_head', 'score')"
        )
    return found


# Task heads PEFT trains in full for these task types (a new, randomly initialised head must learn).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def with_task_heads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with the task head added to ``modules_to_save`` (as PEFT does for classification tasks)."""
    heads = [
        h
        for h in TASK_HEADS.get(str(config.task_type).upper(), ())
        if h not in (config.modules_to_save or ()) and any(matches((h,), n) for n, _ in candidate_modules(model))
    ]
    if not heads:
        return config
    return dataclasses.replace(config, modules_to_save=(*(config.modules_to_save or ()), *heads))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, config: LoraConfig, name: str) -> list[str]:
    """Add adapter ``name`` to every module ``config`` targets, wrapping modules on first use.

    Returns:
        The dotted names of the adapted modules.
    """
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    loftq = config.init_lora_weights == "loftq"
    for path in targets:
        layer = model.get_submodule(path)
        factors = None
        if loftq:  # LoftQ swaps the full-precision base for NF4 codes it chose together with the factors
            layer, *factors = loftq_base(layer, config.rank_for(path), config.loftq_config)
        if not isinstance(layer, LoraLayer):
            layer = wrap(layer)
            set_submodule(model, path, layer)
        layer.update_layer(
            name,
            r=config.rank_for(path),
            lora_alpha=config.alpha_for(path),
            lora_dropout=config.lora_dropout,
            init=True if loftq else config.init_lora_weights,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
        if factors:
            _set_factors(layer, name, *factors)
    for path in saved:
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            set_submodule(model, path, wrapper)
        wrapper.add(name)
    return targets


@torch.no_grad()
def _set_factors(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    layer.lora_A[name].weight.copy_(a)
    layer.lora_B[name].weight.copy_(b)
    if name in getattr(layer, "lora_magnitude_vector", {}):  # DoRA: m = ||W + s B A|| of the new factors
        del layer.lora_magnitude_vector[name]
        layer._init_dora(name)


def unwrap_empty(model: nn.Module) -> None:
    """Put the original module back wherever a wrapper no longer holds any adapter."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and not module.r:
            set_submodule(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave) and not module.adapter_names:
            set_submodule(model, path, module.original_module)


def replace_wrappers(model: nn.Module, merge: bool) -> None:
    """Replace every wrapper by a plain module: merged active adapters (``merge``) or the pristine base."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if merge:
                for name in module.active_adapters:
                    module.merge(name)
            else:
                module.unmerge()
            set_submodule(model, path, module.base_layer)
        elif isinstance(module, ModulesToSave):
            set_submodule(model, path, module.current() if merge else module.original_module)


def resolved_targets(model: nn.Module, targets: list[str]) -> tuple[str, ...]:
    """The shortest list-form ``target_modules`` that selects exactly ``targets`` (for adapter_config.json).

    Leaf names are used when they are unambiguous (what PEFT writes for "all-linear"); otherwise full paths.
    """
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    chosen = set(targets)
    others = [n for n, m in candidate_modules(model) if n not in chosen and supports_lora(_base(m))]
    if any(n.rsplit(".", 1)[-1] in leaves for n in others):
        return tuple(sorted(targets))
    return tuple(sorted(leaves))


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module
