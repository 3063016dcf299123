"""The on-disk cache of GGUF models converted to safetensors, written atomically and checked before use.

A cache folder is an ordinary Hugging Face model directory plus ``lorakit_cache.json``, which records the
GGUF file it came from (size, mtime, sha256), the size of every file written, and the library versions
that produced it. The folder is filled under a temporary name next to its final place and renamed into
place only when complete, so a crash or two racing processes never leave a half-written folder under the
final name; a folder that fails the checks anyway (missing marker, truncated file, other source) is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import FormatError
from lorakit.io.atomic import replace_dir

MARKER = "lorakit_cache.json"
FORMAT = 1
_PRODUCERS = ("lorakit", "transformers", "gguf", "torch", "safetensors")


def cache_problem(target: Path, gguf_path: Path) -> str | None:
    """Says why the cache folder ``target`` must not be trusted for ``gguf_path``, or None if it is valid.

    Checks that the marker exists and has this format, that every file it lists has the recorded size
    (catches truncation), and that the GGUF file is the one it was built from: same size, and same mtime or
    else same sha256 (a reinstall of identical bytes is accepted).
    """
    if not target.is_dir():
        return "it does not exist"
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{MARKER} is missing (an interrupted write, or not written by lorakit)"
    except (OSError, ValueError) as e:
        return f"{MARKER} is unreadable ({e})"
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        return f"{MARKER} is not cache format {FORMAT}"
    files, source = marker.get("files"), marker.get("source")
    if not isinstance(files, dict) or "config.json" not in files or not isinstance(source, dict):
        return f"{MARKER} does not list the files and the source"
    for name, size in files.items():
        path = target / name
        if ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated or changed)"
    stat = gguf_path.stat()
    if source.get("size") != stat.st_size:
        return f"it was built from another GGUF file of {source.get('size')} bytes, not {stat.st_size}"
    if source.get("mtime_ns") != stat.st_mtime_ns and source.get("sha256") != _sha256(gguf_path):
        return f"it was built from another GGUF file (sha256 differs from {gguf_path})"
    return None


def build_if_needed(
    gguf_path: Path, target: Path, convert: Callable[[Path], tuple[Any, Any]], *, quiet: bool = False
) -> bool:
    """Builds the cache folder ``target`` from ``gguf_path`` unless a valid one is there.

    Args:
        gguf_path: the GGUF file.
        target: the cache folder (its parent is created if needed).
        convert: returns an in-memory ``(model, tokenizer)`` pair from the GGUF file, both with
            ``save_pretrained``.
        quiet: if True, print no line on stderr when converting.

    Returns:
        True if the folder was (re)built, False if a valid one was already there.

    Raises:
        FormatError: the saved copy does not reproduce the converted model's logits (nothing is cached).
    """
    if cache_problem(target, gguf_path) is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock") as locked:
        problem = cache_problem(target, gguf_path)  # another process may have built it while we waited
        if problem is None:
            return False
        if locked:  # nobody else is writing: whatever temp folder is left comes from a crash
            _remove_leftovers(target)
        if not quiet:
            why = "" if not target.exists() else f" (the cache there is unusable: {problem})"
            line = f"lorakit: converting {gguf_path.name} to safetensors once (this can take a minute), "
            print(f"{line}cached at {target}{why}", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared (CI)
        try:
            model, tokenizer = convert(gguf_path)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _check_reload(model, tmp)
            _write_marker(tmp, gguf_path)
            replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return True


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Holds an exclusive advisory lock on ``lock_path``; yields False where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone still keeps the cache consistent
        fcntl = None
    if fcntl is None:
        yield False
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _check_reload(model: Any, folder: Path) -> None:
    """Reloads the saved copy and compares logits, so a serialization bug is never cached."""
    reloaded = type(model).from_pretrained(folder, local_files_only=True)
    vocab = model.get_input_embeddings().num_embeddings
    probe = torch.arange(1, min(9, vocab)).unsqueeze(0)  # (1, T) token ids
    with torch.no_grad():
        same = torch.equal(model(probe).logits, reloaded(probe).logits)  # (1, T, vocab)
    if not same:
        raise FormatError(
            f"The safetensors copy of the converted GGUF model (written to {folder}) gives different logits "
            f"than the model in memory, so it was not cached. Pass cache=False to load_model to skip the "
            f"cache, and report this with your transformers version."
        )


def _write_marker(folder: Path, gguf_path: Path) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    stat = gguf_path.stat()
    marker = {
        "format": FORMAT,
        "source": {
            "path": str(gguf_path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": _sha256(gguf_path),
        },
        "files": files,
        "produced_by": {"python": platform.python_version(), **{n: _version(n) for n in _PRODUCERS}},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
