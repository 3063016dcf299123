"""``lorakit export ADAPTER --to gguf --merged``: the base GGUF file with the adapter merged, as one model file.

Only a base that is itself a GGUF file (the embedded default, a user's .gguf) can be written this way: its
metadata (architecture, tokenizer, chat template) is copied key by key, every tensor the adapter does not touch
is copied byte for byte in its original encoding, and each touched tensor is dequantized, gets
``scaling * B A`` (computed in fp32, rows in the GGUF file's order) and is encoded in ``--quant``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import FormatError
from lorakit.export.adapter_files import AdapterFiles, ModuleFactors
from lorakit.export.base_info import BaseInfo, gguf_module
from lorakit.export.gguf_adapter import gguf_tensor_names
from lorakit.export.gguf_write import add_encoded, encode, ggml_type, write_atomically

_SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1"}  # fmt: skip


@dataclass
class MergedExport:
    """What `export_gguf_merged` wrote."""

    path: Path
    changed: list[str]  # GGUF tensors that received an update (encoded in ``quant``)
    copied: int  # tensors copied unchanged
    quant: str


def module_delta(files: AdapterFiles, module: ModuleFactors) -> np.ndarray:
    """``scaling * B A`` in fp32, in the layout of the base weight (linear: (out, in); embedding: (vocab, dim))."""
    delta = (module.b.float() @ module.a.float()) * files.scaling(module)  # (out, in) / (dim, vocab)
    return (delta.T if module.kind == "embedding" else delta).contiguous().numpy()


def export_gguf_merged(
    files: AdapterFiles, base: BaseInfo, out: str | os.PathLike[str], quant: str = "f16"
) -> MergedExport:
    """Writes ``base`` (a GGUF file) with ``files`` merged into it.

    Args:
        files: the adapter.
        base: from `base_info` of a GGUF-backed source.
        out: the ``.gguf`` file to write (atomically).
        quant: encoding of the tensors the adapter changes ("f32", "f16", "bf16", "q8_0", "q4_0", ...).

    Raises:
        FormatError: the base is not a GGUF file.
        IncompatibleAdapterError: a module has no tensor in the base.
    """
    if base.gguf_path is None:
        raise FormatError(
            "--merged writes the base GGUF file with the adapter merged, and this base is a Hugging Face folder. "
            "Run `lorakit merge --model BASE --adapter ADAPTER --out DIR`, then llama.cpp's "
            "convert_hf_to_gguf.py DIR, or export the adapter alone (without --merged)."
        )
    qtype = ggml_type(quant)
    gguf = gguf_module()
    names = gguf_tensor_names(files, base)
    deltas: dict[str, np.ndarray] = {}
    for path, module in files.modules.items():
        name = names[path]
        delta = module_delta(files, module)
        delta = delta if module.kind == "embedding" else base.to_gguf_rows(name, delta)
        deltas[name] = deltas[name] + delta if name in deltas else delta
    reader = gguf.GGUFReader(base.gguf_path)
    report = MergedExport(Path(out), [], 0, quant)

    def build(tmp: Path) -> Any:
        writer = gguf.GGUFWriter(tmp, base.arch)
        _copy_metadata(reader, writer)
        writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[quant]]))
        for tensor in reader.tensors:
            if tensor.name in deltas:
                weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(deltas[tensor.name].shape)
                data, written = encode(weight + deltas[tensor.name], qtype)
                add_encoded(writer, tensor.name, data, written)
                report.changed.append(tensor.name)
            else:
                add_encoded(writer, tensor.name, np.asarray(tensor.data), tensor.tensor_type)
                report.copied += 1
        return writer

    write_atomically(build, out)
    return report


def _copy_metadata(reader: Any, writer: Any) -> None:
    """Every key/value of the source file (tokenizer, chat template, hyper-parameters) with its own type."""
    types = gguf_module().GGUFValueType
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS) or not field.types:
            continue
        value = field.contents()
        if field.types[0] == types.ARRAY:
            writer.add_key_value(key, value, types.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])
