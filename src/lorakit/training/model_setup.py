"""The model side of a training run: load the base, add the adapter, pre-flight checks, restore a checkpoint.

`lorakit.training.run` drives the run; these are the steps that touch the model itself, including the torchrun
parts (local rank 0 loads first, identical starting adapters, FSDP2 sharding).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from lorakit.adapters import add_adapter
from lorakit.config import default_alpha
from lorakit.errors import ConfigError
from lorakit.training import distributed as dist
from lorakit.training import preflight
from lorakit.training.train_config import TrainConfig

__all__ = [
    "ADAPTER", "base_name", "enable_gradient_checkpointing", "load_base", "load_base_model", "lora_config",
    "per_process_batch", "preflight_model", "prepare_model", "set_adapter_state",
]  # fmt: skip

logger = logging.getLogger("lorakit.training")
ADAPTER = "default"


def load_base_model(name: str, revision: str | None = None, dtype: str = "fp32"):
    from lorakit.models import load_model

    return load_model(name, revision=revision, dtype=dtype)


def lora_config(cfg: TrainConfig, model: torch.nn.Module):
    from lorakit import LoraConfig

    targets = list(cfg.target_modules) if isinstance(cfg.target_modules, tuple) else cfg.target_modules
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else default_alpha(cfg.r)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=cfg.init_lora_weights,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name(cfg, model),
        revision=cfg.revision,
    )


def base_name(cfg: TrainConfig, model: torch.nn.Module) -> str | None:
    """The Hub id when one is known (what PEFT, vLLM and llama.cpp look the base up by), else the name given."""
    from lorakit.models import base_model_id

    loaded = getattr(model, "name_or_path", None)
    return loaded if isinstance(loaded, str) and loaded else base_model_id(cfg.model)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        logger.warning("this model has no gradient_checkpointing_enable(); training without it.")
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def per_process_batch(cfg: TrainConfig, d: dist.Dist) -> TrainConfig:
    """``global_batch_size`` -> rows per micro-batch per process; it must divide evenly."""
    if cfg.global_batch_size is None:
        return cfg
    share = d.world_size * cfg.gradient_accumulation_steps
    if cfg.global_batch_size % share:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by {d.world_size} processes x "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} = {share}; use a multiple of {share}, "
            "or set --batch-size (rows per process per micro-batch) instead."
        )
    return dataclasses.replace(cfg, batch_size=cfg.global_batch_size // share)


def load_base(cfg: TrainConfig, d: dist.Dist):
    """Load the base model; with several processes per machine, local rank 0 first (it fills the model cache)."""
    from lorakit.models import resolve_model_source

    resolve_model_source(cfg.model, cfg.revision)  # a bad name fails on every process alike, before anyone waits
    if d.enabled and d.local_rank != 0:
        dist.barrier(d, "waiting for local rank 0 to load the model")
    model, tokenizer = load_base_model(cfg.model, cfg.revision, cfg.dtype)
    if d.enabled and d.local_rank == 0:
        dist.barrier(d, "waiting for the other processes to load the model")
    # Under FSDP the model stays on the CPU: fully_shard moves each layer to the device as it shards it, so the
    # whole base never has to fit on one device.
    if d.device.type != "cpu" and not d.fsdp:
        model = model.to(d.device)
    return model, tokenizer


def prepare_model(cfg: TrainConfig, model, tokenizer, d: dist.Dist):
    """Load the base (unless given), quantize it if asked, and add the trainable adapter; returns (model, tok)."""
    if model is None:
        model, tokenizer = load_base(cfg, d)
    if cfg.quantize:
        from lorakit.quant import is_quantized, quantize, quantized_bytes

        if not any(is_quantized(m) for m in model.modules()):  # a caller's model may come quantized already
            quantize(model, cfg.quantize)
        logger.info("quantized the frozen base to %s: %s", cfg.quantize, quantized_bytes(model))
    torch.manual_seed(cfg.seed)
    add_adapter(model, lora_config(cfg, model), ADAPTER)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def preflight_model(model, d: dist.Dist) -> None:
    """Say what is adapted, check that the adapter saves and loads, and give every process the same start."""
    logger.info(preflight.targets_summary(model, ADAPTER))
    preflight.check_round_trip(model, ADAPTER)
    if d.enabled:
        dist.broadcast_params(d, [p for p in model.parameters() if p.requires_grad])  # identical starting adapters
    if d.fsdp:
        dist.shard_model(model, d)


def set_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], d: dist.Dist) -> None:
    """Restore full adapter tensors (from a checkpoint) into the model; under FSDP into this process's shards."""
    from lorakit.state import load_adapter_state_dict

    if not d.fsdp:
        load_adapter_state_dict(model, state, ADAPTER, source="checkpoint")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
