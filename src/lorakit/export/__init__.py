"""Shipping adapters to other runtimes: GGUF for llama.cpp (adapter or merged model), flat PEFT for vLLM & co.

The runtime rules that decide what can be shipped where live in `lorakit.runtimes`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorakit.errors import ModelNotFoundError
from lorakit.export.adapter_files import AdapterFiles, ModuleFactors, folded_b, read_adapter_files
from lorakit.export.base_info import BaseInfo, base_info
from lorakit.export.facts import AdapterFacts, adapter_facts
from lorakit.export.flat import export_flat_peft
from lorakit.export.gguf_adapter import AdapterExport, export_gguf_adapter
from lorakit.export.gguf_merged import MergedExport, export_gguf_merged, module_delta

__all__ = [
    "AdapterExport",
    "AdapterFacts",
    "AdapterFiles",
    "BaseInfo",
    "MergedExport",
    "ModuleFactors",
    "adapter_facts",
    "base_info",
    "base_info_for",
    "export_flat_peft",
    "export_gguf_adapter",
    "export_gguf_merged",
    "folded_b",
    "module_delta",
    "read_adapter_files",
    "resolve_base",
]


def resolve_base(files: AdapterFiles, model: str | os.PathLike[str] | None = None) -> BaseInfo:
    """The base model's GGUF facts: ``model`` if given, else the adapter's ``base_model_name_or_path``.

    A lorakit cache folder (a GGUF model converted to safetensors) stands for the GGUF file it came from, so
    an adapter saved from ``load_model("smollm2-135m-instruct")`` still finds its GGUF base.

    Raises:
        ModelNotFoundError: neither names a model that is here.
    """
    name = model if model is not None else files.config.get("base_model_name_or_path")
    if not name:
        raise ModelNotFoundError(
            f"{files.path}: adapter_config.json names no base_model_name_or_path; pass --model BASE "
            f"(an embedded name, a Hugging Face folder or a .gguf file)."
        )
    try:
        return base_info_for(name)
    except ModelNotFoundError as exc:
        hint = "" if model is not None else " (from the adapter's base_model_name_or_path; pass --model to override)"
        raise ModelNotFoundError(f"{exc}{hint}") from exc


def base_info_for(name_or_path: str | os.PathLike[str]) -> BaseInfo:
    """`BaseInfo` of a model name or path; a lorakit cache folder stands for the GGUF file it was made from."""
    from lorakit.hub import fetch_model
    from lorakit.models import embedded_name, resolve_model_source

    source = resolve_model_source(name_or_path)
    if source.kind == "hub":  # lorakit's embedded model stands for its Hub id; other ids come from the HF cache
        embedded = embedded_name(source.name)
        source = resolve_model_source(embedded if embedded else fetch_model(source.name, source.revision))
    if source.kind == "hf_dir":
        marker = source.path / "lorakit_cache.json"
        if marker.is_file():
            origin = Path(json.loads(marker.read_text()).get("source", {}).get("path", ""))
            if origin.is_file():
                source = resolve_model_source(origin)
    return base_info(source)
