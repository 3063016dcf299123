"""``lorakit export ADAPTER --to peft``: the same update as a "flat" PEFT adapter every runtime reads alike.

vLLM, LoRAX and TGI scale every module by the config's ``lora_alpha / r`` and ignore ``rank_pattern`` /
``alpha_pattern``. The flat adapter has one rank R (the largest; smaller factors are zero-padded, which adds
exact zeros to ``B A``), ``lora_alpha = R`` (scale exactly 1) and each module's own scale folded into B.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.export.adapter_files import AdapterFiles
from lorakit.io.atomic import write_adapter_dir
from lorakit.io.peft_format import PREFIX

_KEYS = {"linear": (".lora_A.weight", ".lora_B.weight"), "embedding": (".lora_embedding_A", ".lora_embedding_B")}


def export_flat_peft(files: AdapterFiles, out: str | os.PathLike[str]) -> Path:
    """Writes ``files`` to the folder ``out`` with uniform rank, ``lora_alpha = r`` and scales folded into B."""
    rank = files.max_rank
    tensors: dict[str, torch.Tensor] = dict(files.extra)
    for path, module in files.modules.items():
        pad = rank - module.rank
        dtype = module.b.dtype
        a = F.pad(module.a, (0, 0, 0, pad))  # (R, in)
        b = F.pad(module.b.float() * files.scaling(module), (0, pad)).to(dtype)  # (out, R)
        key_a, key_b = _KEYS[module.kind]
        tensors[PREFIX + path + key_a] = a
        tensors[PREFIX + path + key_b] = b
    config = dict(files.config)
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    write_adapter_dir(out, config, tensors)
    return Path(out)
