"""Adapter cards for the web page: what an adapter folder holds, read from its files without loading it.

A card is the adapter's config (base model, rank, alpha, targets), its size on disk, its parameter count (from
the safetensors header: no tensor is read) and its model card (``README.md``) when the folder has one. The
singular-value spectrum comes from `lorakit.arith.inspect_adapter`, cached per folder state, since an SVD per
layer is the only costly part.
"""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path
from typing import Any

from lorakit.errors import FormatError
from lorakit.io.peft_format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

README_LIMIT = 20_000  # characters of a model card shown on the page


def adapter_card(name: str, folder: Path) -> dict[str, Any]:
    """The card of the adapter in ``folder``; a folder that cannot be read gets a card with ``error`` set."""
    card: dict[str, Any] = {"name": name, "error": None}
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {**card, "error": f"cannot read {CONFIG_NAME}: {exc}"}
    if not isinstance(config, dict):
        return {**card, "error": f"{CONFIG_NAME} is not a JSON object"}
    targets = config.get("target_modules")
    card.update(
        base=config.get("base_model_name_or_path"),
        r=config.get("r"),
        lora_alpha=config.get("lora_alpha"),
        target_modules=sorted(targets) if isinstance(targets, list) else targets,
        use_rslora=bool(config.get("use_rslora", False)),
        use_dora=bool(config.get("use_dora", False)),
        size_bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        readme=_readme(folder),
    )
    try:
        card["parameters"] = safetensors_numel(folder / WEIGHTS_NAME)
    except FormatError as exc:
        card.update(parameters=None, error=str(exc))
        if (folder / LEGACY_WEIGHTS_NAME).is_file():
            card["error"] = None  # a .bin adapter: loadable, but its count would need torch.load
    return card


def _readme(folder: Path) -> str | None:
    path = folder / "README.md"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    return text if len(text) <= README_LIMIT else text[:README_LIMIT] + "\n[... cut: the file is longer]"


def safetensors_numel(path: Path) -> int:
    """The number of elements of every tensor in a safetensors file, from its JSON header alone.

    Raises:
        FormatError: the file is missing or its header is not safetensors'.
    """
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise FormatError(f"cannot read the safetensors header of {path.name}: {exc}") from exc
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for dim in info.get("shape", []):
            n *= int(dim)
        total += n
    return total


class SpectrumCache:
    """`inspect_adapter` reports by folder, recomputed when the folder's files change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple, dict[str, Any]]] = {}

    def get(self, folder: Path) -> dict[str, Any]:
        """The JSON-ready report of the adapter in ``folder`` (see `lorakit.ops.spectrum.AdapterReport`).

        Raises:
            FormatError: the folder is missing or corrupt.
        """
        from lorakit.arith import inspect_adapter

        key = _signature(folder)
        with self._lock:
            hit = self._cache.get(folder)
        if hit is not None and hit[0] == key:
            return hit[1]
        report = inspect_adapter(folder).to_dict()
        with self._lock:
            self._cache[folder] = (key, report)
        return report


def _signature(folder: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()))
    except OSError:
        return ()
