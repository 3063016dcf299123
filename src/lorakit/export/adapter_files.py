"""An adapter folder read as plain data (config dict + named factor pairs), without a model.

Export and the runtime check both look at the files exactly as a runtime would: the raw
``adapter_config.json`` (so features lorakit itself refuses to load, such as DoRA, can still be reported) and
the tensors of ``adapter_model.safetensors`` grouped by module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.errors import FormatError
from lorakit.io.atomic import read_adapter_dir
from lorakit.io.peft_format import PREFIX

_A_SUFFIXES = {".lora_A.weight": "linear", ".lora_embedding_A": "embedding"}
_B_SUFFIXES = {".lora_B.weight": "linear", ".lora_embedding_B": "embedding"}


@dataclass(frozen=True)
class ModuleFactors:
    """One adapted module: ``A (r, in)``, ``B (out, r)`` (PEFT's layout; embeddings: ``A (r, vocab)``)."""

    path: str  # the module's path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" or "embedding"
    a: Tensor
    b: Tensor

    @property
    def rank(self) -> int:
        """The rank of this module's update (the tensors' shape decides, as in every runtime)."""
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterFiles:
    """A PEFT-format adapter folder as data.

    Attributes:
        path: the folder.
        config: the raw ``adapter_config.json`` dict.
        modules: adapted modules by path, in file order.
        extra: tensors that are not LoRA factors (``modules_to_save`` copies, biases, DoRA magnitudes, ...).
    """

    path: Path
    config: dict[str, Any]
    modules: dict[str, ModuleFactors]
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=int(self.config.get("r", 8)))

    def scaling(self, module: ModuleFactors) -> float:
        """What lorakit (and PEFT) multiply this module's ``B A`` by: alpha (per pattern) / r or / sqrt(r)."""
        alpha = float(_pattern_config(self.config).alpha_for(module.path))
        rank = module.rank
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def _pattern_config(raw: dict[str, Any]) -> LoraConfig:
    """Only the fields that decide scaling, so an adapter lorakit cannot load (DoRA, ...) is still readable."""
    try:
        return LoraConfig(
            r=int(raw.get("r", 8)),
            lora_alpha=raw.get("lora_alpha", 8),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        )
    except Exception as exc:  # noqa: BLE001 - ConfigError or a type error from a malformed file
        raise FormatError(f"adapter_config.json has unusable r / lora_alpha / patterns: {exc}") from exc


def read_adapter_files(path: str | os.PathLike[str]) -> AdapterFiles:
    """Reads an adapter folder and pairs its ``lora_A``/``lora_B`` tensors by module.

    Raises:
        FormatError: missing files, or a module with only one of its two factors.
    """
    config, tensors = read_adapter_dir(path)
    halves: dict[str, dict[str, Any]] = {}
    extra: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        found = _split_key(key)
        if found is None:
            extra[key] = tensor
            continue
        module, kind, side = found
        halves.setdefault(module, {"kind": kind})[side] = tensor
    broken = sorted(m for m, h in halves.items() if "a" not in h or "b" not in h)
    if broken:
        raise FormatError(f"{str(path)!r}: modules with only one of lora_A / lora_B: {broken[:5]}")
    modules = {m: ModuleFactors(m, h["kind"], h["a"], h["b"]) for m, h in halves.items()}
    return AdapterFiles(Path(path), config, modules, extra)


def _split_key(key: str) -> tuple[str, str, str] | None:
    body = key.removeprefix(PREFIX)
    for suffixes, side in ((_A_SUFFIXES, "a"), (_B_SUFFIXES, "b")):
        for suffix, kind in suffixes.items():
            if body.endswith(suffix):
                return body[: -len(suffix)], kind, side
    return None


def folded_b(files: AdapterFiles, module: ModuleFactors, alpha: float) -> Tensor:
    """``B`` scaled so that a runtime applying ``alpha / r`` computes what lorakit computes (fp32).

    Runtimes such as llama.cpp read one ``lora_alpha`` and the rank from the tensor shape; ``use_rslora``,
    ``alpha_pattern`` and ``rank_pattern`` change the per-module factor, so the difference goes into ``B``.
    When nothing differs the factor is exactly 1 and ``B`` is returned unchanged.
    """
    factor = files.scaling(module) / (alpha / module.rank)
    b = module.b.float()
    return b if factor == 1.0 else b * factor
