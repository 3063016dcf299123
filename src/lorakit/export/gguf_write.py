"""Encoding tensors for GGUF and writing a `gguf.GGUFWriter` to its final path atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import ConfigError
from lorakit.export.base_info import gguf_module

# name -> GGML type name; the quantized ones are those gguf-py can write (it only reads the k-quants)
TENSOR_TYPES = {
    "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0",
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
}  # fmt: skip
ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's own LoRA converter offers


def ggml_type(name: str, allowed: tuple[str, ...] | None = None) -> Any:
    """The `gguf.GGMLQuantizationType` for a lower-case name such as "q8_0"."""
    allowed = allowed or tuple(TENSOR_TYPES)
    if name not in allowed:
        raise ConfigError(f"GGUF tensor type {name!r} is not supported here; use one of {', '.join(allowed)}")
    return gguf_module().GGMLQuantizationType[TENSOR_TYPES[name]]


def encode(array: np.ndarray, qtype: Any) -> tuple[np.ndarray, Any]:
    """Encodes ``array`` (fp32, rows x cols) in ``qtype``; returns ``(data, the type written)``.

    A row length that the block size does not divide falls back to F16, as llama.cpp's converters do.
    """
    gguf = gguf_module()
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block != 0:
        qtype = gguf.GGMLQuantizationType.F16
    array = np.ascontiguousarray(array, dtype=np.float32)
    return gguf.quants.quantize(array, qtype), qtype


def add_encoded(writer: Any, name: str, data: np.ndarray, qtype: Any) -> None:
    gguf = gguf_module()
    plain = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    writer.add_tensor(name, data, raw_dtype=None if plain else qtype)


def write_atomically(writer_factory: Any, out: str | os.PathLike[str]) -> Path:
    """Builds a writer on a temporary file next to ``out``, writes it, and renames it to ``out``.

    Args:
        writer_factory: called with the temporary path; returns a filled `gguf.GGUFWriter`.
        out: the final file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = writer_factory(Path(tmp))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
