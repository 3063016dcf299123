"""The only code that touches disk for adapters: atomic writes (temp file + fsync + rename) and strict reads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from lorakit.errors import FormatError
from lorakit.io.peft_format import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a ``mkstemp``/``mkdtemp`` result (0600/0700) the permissions a plain ``open``/``mkdir`` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the complete folder ``tmp`` to ``target``; an old ``target`` is moved aside first, removed after.

    A crash leaves either the old folder (possibly under a hidden ``.<name>.old-*`` name) or the new one in
    place, never a half-written one.
    """
    tmp, target = Path(tmp), Path(target)
    trash = None
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(target, trash)
    os.rename(tmp, target)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: dict | None = None) -> None:
    """Atomically write ``tensors`` as a safetensors file (copied to contiguous CPU tensors first)."""
    plain = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(plain, metadata=metadata or {"format": "pt"}))


def write_adapter_dir(
    path: str | os.PathLike,
    config: dict[str, Any],
    tensors: Mapping[str, Tensor],
    readme: Callable[[int], str] | None = None,
) -> None:
    """Write ``adapter_model.safetensors``, the model card ``README.md``, then ``adapter_config.json``, each atomically.

    ``readme`` gets the weights file's size and returns the card; a README.md that lorakit did not write is
    kept. Other files in ``path`` (checkpoints, metrics) are left alone.
    """
    from lorakit.model_card import is_lorakit_card

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FormatError(f"cannot save an adapter to {str(path)!r}: it is a file, expected a directory")
    atomic_save_tensors(path / WEIGHTS_NAME, tensors)
    if readme is not None and is_lorakit_card(path / "README.md"):
        atomic_write_bytes(path / "README.md", readme((path / WEIGHTS_NAME).stat().st_size).encode())
    atomic_write_json(path / CONFIG_NAME, config)


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an adapter directory (PEFT format); every problem raises `FormatError` before anything is used."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"adapter directory {str(path)!r} does not exist (expected a folder with {CONFIG_NAME})")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FormatError(f"{str(path)!r} has no {CONFIG_NAME}; is it an adapter folder? It holds: {_listing(path)}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(
            f"{str(config_file)!r} is not valid JSON ({exc}); re-save or re-download the adapter"
        ) from exc
    return config, _read_weights(path)


def _read_weights(path: Path) -> dict[str, Tensor]:
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        try:
            return load_safetensors_bytes(weights.read_bytes())
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(f"{str(weights)!r} is not a valid safetensors file ({exc}); it may be truncated") from exc
    legacy = path / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt pickles
            raise FormatError(f"{str(legacy)!r} could not be read ({exc})") from exc
        if not isinstance(state, dict):
            raise FormatError(f"{str(legacy)!r} holds {type(state).__name__}, expected a dict of tensors")
        return state
    raise FormatError(f"{str(path)!r} has no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}); it holds: {_listing(path)}")


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())[:10]
