"""Where and in which dtype `lorakit.load_model` puts a model: ``device`` and ``dtype`` ("auto" included)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import ConfigError

__all__ = ["as_dtype", "pick_dtype", "placement"]

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


def placement(device: torch.device | str | None) -> torch.device | str | None:
    """Where a ``device`` argument puts the model.

    Returns None (the CPU, untouched), a torch.device, or "auto-map" (CUDA + accelerate: ``device_map="auto"``).

    Raises:
        ConfigError: CUDA asked for where there is none, or text that is no device.
    """
    if device is None or isinstance(device, torch.device):
        return device
    text = str(device).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return "auto-map" if importlib.util.find_spec("accelerate") is not None else torch.device("cuda")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device='cpu' or 'auto'.")
    try:
        return torch.device(text)
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is not a device; use 'auto', 'cpu' or 'cuda[:N]'.") from e


def pick_dtype(dtype: torch.dtype | str, folder: Path | None, placement: Any) -> torch.dtype:
    """The parameter dtype: ``dtype`` itself, or for "auto" the checkpoint's dtype on CUDA and fp32 on the CPU."""
    if not (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return as_dtype(dtype)
    on_gpu = placement == "auto-map" or (isinstance(placement, torch.device) and placement.type == "cuda")
    if not on_gpu or folder is None:
        return torch.float32
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    saved = config.get("torch_dtype") or config.get("dtype") or "float32"
    return _DTYPES.get(str(saved).removeprefix("torch."), torch.float32)


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or its name ("float32", "bf16", "fp16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use a torch.dtype or one of {sorted(_DTYPES)}.")
    return _DTYPES[key]
