"""``lorakit export ADAPTER --to gguf``: a GGUF LoRA adapter for llama.cpp and what is built on it.

The file is what llama.cpp's ``convert_lora_to_gguf.py`` makes (read for the format, not copied):
``general.type = "adapter"``, ``adapter.type = "lora"``, one float ``adapter.lora.alpha``, and for every adapted
base tensor ``<name>.lora_a`` (GGUF shape ``[in, r]``, i.e. A) and ``<name>.lora_b`` (``[r, out]``, i.e. B),
named after the base GGUF tensor. llama.cpp scales each pair by ``alpha / r`` with r read from the tensor, so
whatever else lorakit multiplies by (rsLoRA, ``alpha_pattern``, ``rank_pattern``) is folded into B first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorakit.errors import IncompatibleAdapterError
from lorakit.export.adapter_files import AdapterFiles, ModuleFactors, folded_b
from lorakit.export.base_info import BaseInfo, gguf_module
from lorakit.export.gguf_write import ADAPTER_TYPES, add_encoded, encode, ggml_type, write_atomically


@dataclass
class AdapterExport:
    """What `export_gguf_adapter` wrote."""

    path: Path
    tensors: int
    folded: list[str] = field(default_factory=list)  # modules whose B carries a folded scale
    f16_fallback: list[str] = field(default_factory=list)  # tensors written F16 (row not a block multiple)


def export_gguf_adapter(
    files: AdapterFiles, base: BaseInfo, out: str | os.PathLike[str], outtype: str = "f32"
) -> AdapterExport:
    """Writes ``files`` as a GGUF LoRA adapter for ``base``.

    Args:
        files: the adapter (see `read_adapter_files`).
        base: the base model's GGUF facts (see `base_info`).
        out: the ``.gguf`` file to write (atomically).
        outtype: "f32", "f16", "bf16" or "q8_0" for the factors.

    Raises:
        IncompatibleAdapterError: a module has no GGUF tensor in this base (or the tied output head).
    """
    qtype = ggml_type(outtype, ADAPTER_TYPES)
    names = gguf_tensor_names(files, base)
    alpha = files.lora_alpha
    report = AdapterExport(Path(out), 0)
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    for path, module in files.modules.items():
        a, b = _ab_arrays(files, module, alpha, names[path], base)
        if files.scaling(module) != alpha / module.rank:
            report.folded.append(path)
        pairs.append((names[path], a, b))

    def build(tmp: Path):
        writer = gguf_module().GGUFWriter(tmp, base.arch)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_string("general.name", f"lorakit adapter {files.path.name}")
        for name, a, b in pairs:
            for suffix, array in ((".lora_a", a), (".lora_b", b)):
                data, written = encode(array, qtype)
                if written != qtype:
                    report.f16_fallback.append(name + suffix)
                add_encoded(writer, name + suffix, data, written)
                report.tensors += 1
        return writer

    write_atomically(build, out)
    return report


def _ab_arrays(
    files: AdapterFiles, module: ModuleFactors, alpha: float, name: str, base: BaseInfo
) -> tuple[np.ndarray, np.ndarray]:
    """A and the folded B as numpy arrays in the GGUF file's row order (numpy shape = reversed GGUF shape)."""
    b = folded_b(files, module, alpha).numpy()  # (out, r)
    a = module.a.float().numpy()  # (r, in)
    if module.kind == "embedding":
        # token_embd pairs are stored flipped: lora_a (vocab, r), lora_b (n_embd, r) (llama-adapter.cpp)
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b)
    return a, base.to_gguf_rows(name, b)


def gguf_tensor_names(files: AdapterFiles, base: BaseInfo) -> dict[str, str]:
    """Each adapted module's GGUF tensor name in ``base``; every module without one is reported in one error."""
    names, problems = {}, []
    for path in files.modules:
        name = base.tensor_name(path)
        if name is None:
            problems.append(f"{path} (no GGUF tensor name for it in architecture {base.arch!r})")
        elif name == "output.weight" and base.tied_output:
            problems.append(f"{path} (the output head is tied to token_embd in this base; llama.cpp has no tensor)")
        elif base.tensor_names is not None and name not in base.tensor_names:
            problems.append(f"{path} -> {name} (not a tensor of the base GGUF file)")
        else:
            names[path] = name
    if problems:
        raise IncompatibleAdapterError(
            "these adapted modules cannot be expressed as a llama.cpp LoRA for this base: " + "; ".join(problems)
        )
    return names
