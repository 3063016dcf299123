"""Save and load adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import active_adapters, add_adapter, delete_adapter, get_config, list_adapters
from lorakit.config import LoraConfig
from lorakit.errors import AdapterExistsError, ConfigError, FormatError, IncompatibleAdapterError, TargetNotFoundError
from lorakit.io.atomic import read_adapter_dir, write_adapter_dir
from lorakit.io.peft_format import CONFIG_NAME, PREFIX, from_peft_state, to_peft_state
from lorakit.layers import LoraEmbedding, ModulesToSave, iter_lora_layers
from lorakit.state import adapter_state_dict, load_adapter_state_dict


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | Sequence[str] | None = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter ``name`` to the folder ``path`` in PEFT's format, atomically (file by file).

    Several names (or None for all) use PEFT's layout: "default" in ``path`` itself, the others in
    ``path/<name>/``. ``state_dict`` (one name only) writes those tensors, keyed as `adapter_state_dict` keys
    them, instead of the model's live ones: e.g. an adapter gathered from FSDP shards.
    """
    if isinstance(name, str):
        _save_one(model, Path(path), name, state_dict)
        return
    if state_dict is not None:
        raise ConfigError(
            f"save_adapter(state_dict=...) writes one adapter, got name={name!r}; pass a single adapter name"
        )
    names = list_adapters(model) if name is None else list(name)
    for n in names:
        _save_one(model, Path(path) if n == "default" else Path(path) / n, n)


def _save_one(model: nn.Module, path: Path, name: str, state: dict[str, torch.Tensor] | None = None) -> None:
    config = get_config(model, name)
    tensors = to_peft_state(adapter_state_dict(model, name, config.bias) if state is None else state, name)
    write_adapter_dir(path, dataclasses.replace(config, inference_mode=True).to_dict(), tensors)


def _saved_base_embeddings(model: nn.Module, state: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pop the full base embedding matrices PEFT saves next to embedding adapters (``save_embedding_layers``).

    PEFT writes them so that an adapter trained after resizing the vocabulary carries its new rows; loading puts
    them into the base embedding, as PEFT does. A shape that does not fit is an `IncompatibleAdapterError`.
    """
    out, problems = [], []
    for path, layer in iter_lora_layers(model):
        key = PREFIX + f"{path}.base_layer.weight"
        if isinstance(layer, LoraEmbedding) and key in state:
            value, weight = state.pop(key), layer.base_layer.weight
            if value.shape != weight.shape:
                problems.append(f"{path}: saved embedding {tuple(value.shape)} vs model {tuple(weight.shape)}")
            out.append((weight, value))
    if problems:
        raise IncompatibleAdapterError(
            "the adapter's saved embeddings do not fit (was the vocabulary resized? resize the model's token "
            "embeddings to the adapter's vocabulary first): " + "; ".join(problems)
        )
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, trainable: bool = False) -> str:
    """Load a PEFT-format adapter folder into ``model`` (injecting LoRA layers as needed).

    The first adapter on a model becomes active; later ones are loaded inactive (use `set_adapter`). On any
    error the model is left exactly as it was.

    Args:
        model: The base model (with or without other adapters).
        path: Folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``).
        name: Name to load it under (default "default").
        trainable: Make the adapter trainable (freezing everything else) instead of frozen.

    Returns:
        The adapter's name.

    Raises:
        FormatError: missing or corrupt files.
        IncompatibleAdapterError: the adapter does not fit this model.
        AdapterExistsError: ``name`` is already loaded.
    """
    name = "default" if name is None else name
    if name in list_adapters(model):
        raise AdapterExistsError(f"an adapter named {name!r} is already loaded; pass name='...' to load it as another")
    raw, file_state = read_adapter_dir(path)
    config = LoraConfig.from_dict(raw, source=str(Path(path) / CONFIG_NAME))
    config = dataclasses.replace(config, inference_mode=not trainable)
    try:
        add_adapter(model, config, name, activate=not active_adapters(model), trainable=trainable)
    except TargetNotFoundError as exc:
        raise IncompatibleAdapterError(f"adapter {str(path)!r} does not fit {type(model).__name__}: {exc}") from exc
    try:
        expected = list(adapter_state_dict(model, name, config.bias))
        saved = [p for p, m in model.named_modules() if isinstance(m, ModulesToSave)]
        state = from_peft_state(file_state, expected, name, saved)
        embeddings = _saved_base_embeddings(model, state)
        load_adapter_state_dict(model, state, name, config.bias, source=f"adapter {str(path)!r}")
        with torch.no_grad():
            for weight, value in embeddings:
                weight.copy_(value)
    except BaseException:
        delete_adapter(model, name)
        raise
    return name


def load_adapters(model: nn.Module, folder: str | os.PathLike, trainable: bool = False) -> list[str]:
    """Load every adapter under ``folder``: each sub-folder holding an ``adapter_config.json``, named after it.

    A ``folder`` that is itself an adapter (PEFT's multi-adapter layout) loads as "default" first. Returns the
    names loaded, in order; the first becomes active if none is.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"adapter folder {str(folder)!r} does not exist")
    dirs = ([("default", folder)] if (folder / CONFIG_NAME).is_file() else []) + [
        (d.name, d) for d in sorted(folder.iterdir()) if d.is_dir() and (d / CONFIG_NAME).is_file()
    ]
    if not dirs:
        raise FormatError(f"{str(folder)!r} holds no adapter (no sub-folder with {CONFIG_NAME})")
    return [load_adapter(model, path, name=name, trainable=trainable) for name, path in dirs]
