"""transformers' side of model loading: a Hugging Face folder, and a GGUF file dequantized to fp32.

`lorakit.models` resolves names (embedded, local, Hub) and the cache; this module is the part that calls
transformers, and the only one that knows its version differences.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import FormatError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["convert_gguf", "dtype_kwarg", "load_hf_dir", "transformers_module"]


def transformers_module() -> Any:
    """Imports transformers, or raises ImportError naming the extra that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"Loading models needs transformers, which is not importable ({e}). "
            f"Install lorakit's model extra: pip install 'lorakit[hf]'"
        ) from e
    return transformers


def dtype_kwarg(transformers: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    major, minor = (int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_hf_dir(path: Path, dtype: torch.dtype, where: Any = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads model + tokenizer from a local folder (no network); ``where``: a device, "auto-map" or None."""
    transformers = transformers_module()
    kwargs = {"local_files_only": True, **dtype_kwarg(transformers, dtype)}
    if where == "auto-map":
        kwargs["device_map"] = "auto"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"transformers could not load a causal LM from {path}: {e}") from e
    if isinstance(where, torch.device):
        model = model.to(where)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(
            f"{path} has model weights but no loadable tokenizer ({str(e).splitlines()[0]}); save the "
            f"model's tokenizer next to them with tokenizer.save_pretrained({str(path)!r})."
        ) from e
    return model, tokenizer


def convert_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantizes a GGUF file to an fp32 model + tokenizer in memory, ready for ``save_pretrained``."""
    transformers = transformers_module()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {gguf_path.name} needs the gguf package: pip install 'lorakit[hf]'")
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, **kwargs, **dtype_kwarg(transformers, torch.float32)
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
