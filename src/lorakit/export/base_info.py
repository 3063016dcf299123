"""What the GGUF side needs to know about an adapter's base model: architecture, heads, tensor names.

A GGUF base (the embedded default, a user's .gguf) tells everything in its own metadata; a Hugging Face folder
tells it in ``config.json``, mapped to llama.cpp's architecture names by the small table below. Tensor names
come from the ``gguf`` package's own architecture maps (`gguf.TensorNameMap`), the ones llama.cpp's converters use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import FormatError
from lorakit.models import ModelSource

# Hugging Face architectures whose GGUF layout lorakit knows (llama.cpp's convert_hf_to_gguf.py registers
# these classes under these GGUF architecture names).
HF_TO_GGUF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
    "GemmaForCausalLM": "gemma",
    "Phi3ForCausalLM": "phi3",
}
# llama.cpp's llama converter reorders the rows of q and k (rotary halves interleaved); the row permutation
# applies to B of a LoRA pair (convert_hf_to_gguf.py, LlamaModel.permute).
_PERMUTED_ARCHS = {"llama"}


def gguf_module() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(f"GGUF export needs the gguf package ({exc}): pip install 'lorakit[hf]'") from exc
    return gguf


@dataclass(frozen=True)
class BaseInfo:
    """The base model as the GGUF side sees it.

    Attributes:
        arch: GGUF architecture name ("llama", ...).
        n_layer: number of blocks.
        n_head: attention heads.
        n_head_kv: key/value heads.
        tensor_names: names of the base's GGUF tensors, or None when the base is not a GGUF file.
        tied_output: the output head shares the token embedding (no ``output.weight``).
        gguf_path: the GGUF file, when the base is one.
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    tensor_names: frozenset[str] | None
    tied_output: bool
    gguf_path: Path | None = None

    def tensor_name(self, module_path: str) -> str | None:
        """The GGUF weight name (``blk.0.attn_q.weight``) of a Hugging Face module path, or None."""
        gguf = gguf_module()
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch), None)
        if arch is None:  # an architecture this gguf package does not know
            return None
        name = gguf.get_tensor_name_map(arch, self.n_layer).get_name(module_path)
        return None if name is None else f"{name}.weight"

    def to_gguf_rows(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """Reorders output rows (of B or of a whole weight) from Hugging Face's layout to the GGUF file's."""
        if self.arch not in _PERMUTED_ARCHS:
            return rows
        if gguf_name.endswith("attn_q.weight"):
            heads = self.n_head
        elif gguf_name.endswith("attn_k.weight"):
            heads = self.n_head_kv
        else:
            return rows
        # (heads, 2, half, ...) -> (heads, half, 2, ...): the two rotary halves interleave
        shaped = rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        return np.ascontiguousarray(shaped.swapaxes(1, 2).reshape(rows.shape))


def base_info(source: ModelSource) -> BaseInfo:
    """Reads the architecture facts of a resolved model source (no weights are loaded)."""
    if source.kind == "hf_dir":
        return _from_hf_config(source.path / "config.json")
    reader = gguf_module().GGUFReader(source.path)
    fields = reader.fields

    def value(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    arch = value("general.architecture")
    names = frozenset(t.name for t in reader.tensors)
    n_head = int(value(f"{arch}.attention.head_count", 0))
    return BaseInfo(
        arch=arch,
        n_layer=int(value(f"{arch}.block_count", 0)),
        n_head=n_head,
        n_head_kv=int(value(f"{arch}.attention.head_count_kv", n_head)),
        tensor_names=names,
        tied_output="output.weight" not in names,
        gguf_path=source.path,
    )


def _from_hf_config(path: Path) -> BaseInfo:
    config = json.loads(path.read_text())
    archs = config.get("architectures") or []
    known = [HF_TO_GGUF_ARCH[a] for a in archs if a in HF_TO_GGUF_ARCH]
    if not known:
        raise FormatError(
            f"{path}: architectures={archs} has no GGUF mapping in lorakit (known: {sorted(HF_TO_GGUF_ARCH)}); "
            f"convert it with llama.cpp's convert_lora_to_gguf.py instead."
        )
    n_head = int(config.get("num_attention_heads", config.get("n_head", 0)))
    return BaseInfo(
        arch=known[0],
        n_layer=int(config.get("num_hidden_layers", config.get("n_layer", 0))),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads", n_head)),
        tensor_names=None,
        tied_output=bool(config.get("tie_word_embeddings", True)),
    )
