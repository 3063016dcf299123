"""Cheap checks of an adapter folder without loading its tensors: is it worth listing as servable?

Reads ``adapter_config.json`` and only the header of ``adapter_model.safetensors`` (the tensors' dtypes, shapes
and byte ranges), and checks that the file is as long as the header says: a truncated or overwritten file is
caught without reading gigabytes. A full read (`lorakit.io.checkpoint.read_adapter_dir`) still happens on load.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from lorakit.errors import FormatError
from lorakit.io.peft_format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

_MAX_HEADER = 100 << 20  # safetensors' own cap on the JSON header


def verify_adapter_dir(path: str | os.PathLike, shown: str | None = None) -> None:
    """Raise `FormatError` if ``path`` is visibly not a loadable adapter folder.

    Args:
        path: The folder.
        shown: How to name the folder in messages (default: its path), e.g. relative to a served directory.
    """
    path = Path(path)
    shown = shown if shown is not None else str(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{shown}/{CONFIG_NAME} is not readable JSON ({type(exc).__name__}); re-save it") from exc
    if not isinstance(config, dict):
        raise FormatError(f"{shown}/{CONFIG_NAME} holds {type(config).__name__}, expected a JSON object")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if (path / LEGACY_WEIGHTS_NAME).is_file():
            return
        raise FormatError(f"{shown} has no {WEIGHTS_NAME}; re-save the adapter")
    _verify_safetensors(weights, f"{shown}/{WEIGHTS_NAME}")


def _verify_safetensors(file: Path, shown: str) -> None:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise FormatError(f"{shown} is not a valid safetensors file (bad header length); it may be truncated")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{shown} is not a valid safetensors file (unreadable header)") from exc
    ends = [
        v["data_offsets"][1]
        for k, v in (header.items() if isinstance(header, dict) else ())
        if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
    ]
    if not isinstance(header, dict) or 8 + length + max(ends, default=0) != size:
        raise FormatError(
            f"{shown} is not a valid safetensors file ({size} bytes, the header describes a different size); "
            "it may be truncated"
        )
