"""Save and load adapters in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import active_adapters, add_adapter, delete_adapter, get_config, list_adapters
from lorakit.config import LoraConfig
from lorakit.errors import AdapterExistsError, ConfigError, FormatError, IncompatibleAdapterError, TargetNotFoundError
from lorakit.hub import base_key, fetch_adapter, is_hub_id
from lorakit.io.atomic import read_adapter_dir, write_adapter_dir
from lorakit.io.peft_format import CONFIG_NAME, PREFIX, from_peft_state, to_peft_state
from lorakit.layers import LoraEmbedding, ModulesToSave, iter_lora_layers
from lorakit.layers.data_init import as_plain_lora
from lorakit.model_card import CardInfo, render_card
from lorakit.ops.inits import is_data_init
from lorakit.state import adapter_state_dict, load_adapter_state_dict

logger = logging.getLogger(__name__)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | Sequence[str] | None = "default",
    state_dict: dict[str, torch.Tensor] | None = None,
    card: CardInfo | None = None,
    convert_to_lora: bool = False,
) -> None:
    """Write adapter ``name`` to the folder ``path`` in PEFT's format, atomically (file by file).

    Several names (or None for all) use PEFT's layout: "default" in ``path`` itself, the others in
    ``path/<name>/``. ``state_dict`` (one name only) writes those tensors, keyed as `adapter_state_dict` keys
    them, instead of the model's live ones: e.g. an adapter gathered from FSDP shards. Every folder gets a
    model card (``README.md`` with the Hub's front matter, see `lorakit.model_card`); ``card`` adds the
    training settings and eval table to it.

    ``convert_to_lora`` (PiSSA / OLoRA adapters) writes the trained adapter as a plain LoRA adapter of rank 2r
    relative to the *original* base weights, which then load it like any adapter (PEFT's
    ``path_initial_model_for_weight_conversion``); the in-memory model is unchanged.
    """
    if isinstance(name, str):
        _save_one(model, Path(path), name, state_dict, card, convert_to_lora)
        return
    if convert_to_lora:
        raise ValueError("save_adapter(convert_to_lora=True) converts one adapter; pass a single name.")
    if state_dict is not None:
        raise ConfigError(
            f"save_adapter(state_dict=...) writes one adapter, got name={name!r}; pass a single adapter name"
        )
    names = list_adapters(model) if name is None else list(name)
    for n in names:
        _save_one(model, Path(path) if n == "default" else Path(path) / n, n)


def _save_one(
    model: nn.Module,
    path: Path,
    name: str,
    state: dict[str, torch.Tensor] | None = None,
    card: CardInfo | None = None,
    convert: bool = False,
) -> None:
    config = get_config(model, name)
    state = adapter_state_dict(model, name, config.bias) if state is None else state
    if convert:
        layers = [(p, layer) for p, layer in iter_lora_layers(model) if name in layer.r]
        state, config = as_plain_lora(layers, name, state, config)
    tensors = to_peft_state(state, name)
    saved = dataclasses.replace(config, inference_mode=True).to_dict()
    if saved.get("task_type") is None and hasattr(model, "config"):
        # PEFT's own record for a config without task_type: AutoPeftModel rebuilds the base class from it
        saved["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    params = sum(t.numel() for t in tensors.values())
    info = card or CardInfo(title=path.resolve().name)
    write_adapter_dir(path, saved, tensors, lambda size: render_card(saved, size, trainable_params=params, info=info))


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


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    trainable: bool = False,
    revision: str | None = None,
) -> str:
    """Load a PEFT-format adapter (a folder or a Hub id) into ``model`` (injecting LoRA layers as needed).

    The first adapter on a model becomes active; later ones are loaded inactive (use `set_adapter`). On any
    error the model is left exactly as it was. An adapter whose config names another base model than
    ``model.name_or_path`` loads with a warning naming both (shapes that do not fit stay an error).

    Args:
        model: The base model (with or without other adapters).
        path: Folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``), or a Hub id
            (``org/adapter``) when no such folder exists: fetched into the Hugging Face cache.
        name: Name to load it under (default "default").
        trainable: Make the adapter trainable (freezing everything else) instead of frozen.
        revision: Hub branch, tag or commit of a Hub id (default "main").

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
    path = adapter_location(path, revision)
    raw, file_state = read_adapter_dir(path)
    config = LoraConfig.from_dict(raw, source=str(Path(path) / CONFIG_NAME))
    _warn_if_other_base(model, config.base_model_name_or_path, path)
    config = dataclasses.replace(config, inference_mode=not trainable)
    if is_data_init(config.init_lora_weights):  # the file holds the factors: never re-run PiSSA/OLoRA/LoftQ on the base
        logger.warning(
            "adapter %s was made with init_lora_weights=%r: it fits the residual base of that run (for the original "
            "base, save it with save_adapter(..., convert_to_lora=True))",
            path,
            config.init_lora_weights,
        )
        config = dataclasses.replace(config, init_lora_weights=True)
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


def adapter_location(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of an adapter: ``path`` itself, or a Hub id's snapshot in the Hugging Face cache.

    Raises:
        HubError: a Hub id that cannot be fetched (gated, missing, offline and not cached).
        FormatError: ``revision`` given for a local folder.
    """
    text = os.fspath(path)
    if Path(text).expanduser().exists() or not is_hub_id(text):
        if revision is not None:
            raise FormatError(f"revision={revision!r} applies to Hub ids only; {text!r} is a local path")
        return Path(text).expanduser()
    return fetch_adapter(text, revision)


def _warn_if_other_base(model: nn.Module, base: str | None, path: Path) -> None:
    loaded = getattr(model, "name_or_path", None)
    if not base or not isinstance(loaded, str) or not loaded or base_key(base) == base_key(loaded):
        return
    warnings.warn(
        f"adapter {str(path)!r} was trained on base model {base!r}, but it is being loaded into {loaded!r}; "
        f"its outputs may be meaningless unless these are the same model (shapes are still checked).",
        stacklevel=3,
    )


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
