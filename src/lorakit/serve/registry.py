"""Which adapters a server can serve, which are in memory, and the LRU cap on resident adapters.

Every sub-folder of the adapters directory that holds ``adapter_config.json`` is servable under its folder
name; the folder is read and loaded (`lorakit.load_adapter`) into the one base model on first use. A name not
known yet triggers a rescan, so folders dropped in later are served without a restart. A folder that fails to
load (corrupt, or made for another base) is refused with the loader's message and remembered until its files
change; the model is left as it was, so every other adapter keeps serving.

Confinement: adapter names are ``[A-Za-z0-9_-]`` (at most 64 characters; no dots, which PyTorch module names
cannot hold), and every folder, scanned or added at runtime, must resolve (symlinks followed) to a place inside
the adapters directory, unless the registry was made with ``allow_paths=True``. Messages name folders relative
to the adapters directory, so nothing outside it is ever shown to a client.

Model changes (load, delete) are handed to ``run_on_model`` (the batcher's `call`), which runs them between
forward passes on the scheduler thread; reading and validating the files happens before, on the caller's thread,
so a slow disk does not stall requests that use other adapters.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import lorakit
from lorakit.errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    LorakitError,
)
from lorakit.io.atomic import read_adapter_dir
from lorakit.io.peft_format import CONFIG_NAME
from lorakit.io.verify import verify_adapter_dir

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _run_here(fn: Callable[[], object]) -> Future:
    future: Future = Future()
    future.set_result(fn())
    return future


class AdapterRegistry:
    """Adapters of one base model: discovered in ``directory``, added at runtime, loaded on demand, LRU-evicted.

    Args:
        model: The base model the adapters load into.
        directory: Folder whose sub-folders are adapters (None: only runtime-added adapters).
        max_adapters: Most adapters resident at once (None: no cap). Adapters in use by a request are pinned;
            when every resident adapter is pinned the cap is exceeded until requests finish, rather than stall.
        run_on_model: Runs a model-changing callable at a safe point and returns a Future (default: right here).
        reserved: Names adapters may not take (the base model's name).
        allow_paths: Let `add` load folders outside ``directory`` (trusted clients only).
        allow_hub: `add` accepts a Hub id (``org/adapter``) as the path and fetches it into the HF cache.
    """

    MAX_FAILED = 1024  # remembered load failures (oldest forgotten first): bounded however many names are tried

    def __init__(
        self,
        model,
        directory: str | os.PathLike | None = None,
        *,
        max_adapters: int | None = None,
        run_on_model: Callable[[Callable[[], object]], Future] = _run_here,
        reserved: tuple[str, ...] = (),
        allow_paths: bool = False,
        allow_hub: bool = False,
    ) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise ConfigError(f"max_adapters must be at least 1 (or None for no cap), got {max_adapters}")
        self.model, self.max_adapters, self.run_on_model = model, max_adapters, run_on_model
        self.directory = Path(directory) if directory is not None else None
        self.reserved, self.allow_paths = set(reserved), allow_paths
        self.allow_hub = allow_hub
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._runtime: set[str] = set()  # added through `add`: kept across rescans
        self._removed: set[str] = set()  # deleted through `remove`: rescans skip them until added again
        self._failed: OrderedDict[str, tuple[tuple, str]] = OrderedDict()  # name -> (files signature, message)
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident adapters, least recently used first
        self._pins: Counter[str] = Counter()
        self._load_locks: dict[str, threading.Lock] = {}
        self._checked: dict[str, tuple] = {}  # folder name -> files signature that passed `verify_adapter_dir`
        self.scan()

    # ---- discovery ----------------------------------------------------------------------------------------
    def scan(self) -> None:
        """Re-read the adapters directory (new folders become servable, vanished ones are forgotten)."""
        found: dict[str, Path] = {}
        if self.directory is not None and self.directory.is_dir():
            for sub in sorted(self.directory.iterdir()):
                name = sub.name
                if self._valid(name) and name not in self._removed and (sub / CONFIG_NAME).is_file():
                    if self.allow_paths or self._inside(sub):
                        found[name] = sub.resolve()
        with self._lock:
            runtime = {n: self._paths[n] for n in self._runtime if n in self._paths}
            self._paths = {**found, **runtime}
        self._checked = {n: sig for n, sig in self._checked.items() if n in found}
        for name, path in found.items():
            self._verify(name, path)

    def _valid(self, name: str) -> bool:
        return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and name not in self.reserved

    def _inside(self, path: Path) -> bool:
        return self.directory is not None and path.resolve().is_relative_to(self.directory.resolve())

    def shown(self, path: Path) -> str:
        """``path`` as clients see it: relative to the adapters directory when inside it."""
        if self.directory is not None and path.is_relative_to(self.directory.resolve()):
            return path.relative_to(self.directory.resolve()).as_posix()
        return str(path) if self.allow_paths else "a folder outside the adapters directory"

    def _verify(self, name: str, path: Path) -> None:
        """Check a folder's files cheaply (header only) once per change, so broken ones are not listed."""
        signature = _signature(path)
        failed = self._failed.get(name)
        if self._checked.get(name) == signature or (failed is not None and failed[0] == signature):
            return
        try:
            verify_adapter_dir(path, shown=self.shown(path))
        except LorakitError as exc:
            self._remember_failure(name, signature, f"adapter {name!r} cannot be served: {exc}")
        else:
            self._checked[name] = signature

    def _remember_failure(self, name: str, signature: tuple, message: str) -> None:
        with self._lock:
            self._failed[name] = (signature, message)
            self._failed.move_to_end(name)
            while len(self._failed) > self.MAX_FAILED:
                self._failed.popitem(last=False)

    def status(self) -> list[dict]:
        """Every known adapter with its folder, whether it is resident, and its load error if it is broken."""
        with self._lock:
            paths, resident = dict(self._paths), set(self._lru)
        out = []
        for name in sorted(paths):
            failed = self._failed.get(name) if self._still_failed(name, paths[name]) else None
            out.append(
                {
                    "id": name,
                    "object": "adapter",
                    "path": self.shown(paths[name]),
                    "resident": name in resident,
                    "status": "error" if failed else "ok",
                    "error": failed[1] if failed else None,
                }
            )
        return out

    def names(self) -> list[str]:
        """Servable adapter names (known ones minus those that failed to load and have not changed since)."""
        with self._lock:
            paths = dict(self._paths)
        return sorted(n for n in paths if not self._still_failed(n, paths[n]))

    def resident(self) -> list[str]:
        """Adapters in memory, least recently used first."""
        with self._lock:
            return list(self._lru)

    def path(self, name: str) -> Path:
        """The folder of adapter ``name``; rescans once before giving up.

        Raises:
            AdapterNotFoundError: unknown after a rescan (the message lists the servable names).
        """
        with self._lock:
            path = self._paths.get(name)
        if path is None:
            self.scan()
            with self._lock:
                path = self._paths.get(name)
        if path is None:
            shown = name if self._valid(name) else "this name"
            raise AdapterNotFoundError(f"adapter {shown!r} not found; servable adapters: {self.names()}")
        return path

    # ---- use ----------------------------------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Make ``name`` resident (loading it if needed) and pin it until `release`.

        Raises:
            AdapterNotFoundError: unknown name.
            IncompatibleAdapterError / FormatError / ConfigError: the folder cannot be loaded into this model.
        """
        path = self.path(name)
        with self._lock:
            lock = self._load_locks.setdefault(name, threading.Lock())
        with lock:  # one load per name at a time; others wait and then find it resident
            with self._lock:
                if name in self._lru:
                    self._lru.move_to_end(name)
                    self._pins[name] += 1
                    return
            self._load(name, path)
            with self._lock:
                self._lru[name] = None
                self._pins[name] += 1
        self._evict_over_cap()

    def release(self, name: str) -> None:
        """Unpin ``name`` (a request using it finished); evicts down to the cap if it was exceeded."""
        with self._lock:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]
        self._evict_over_cap()

    def _load(self, name: str, path: Path) -> None:
        failed = self._failed.get(name)
        if failed is not None and failed[0] == _signature(path):
            raise IncompatibleAdapterError(failed[1])
        signature = _signature(path)
        try:
            verify_adapter_dir(path, shown=self.shown(path))
            read_adapter_dir(path)  # corrupt files fail here, off the scheduler thread
            self.run_on_model(lambda: lorakit.load_adapter(self.model, path, name=name)).result()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one clear refusal
            reason = str(exc) if isinstance(exc, LorakitError) else f"{type(exc).__name__}: {exc}"
            reason = reason.replace(str(path), self.shown(path))
            message = f"adapter {name!r} (folder {self.shown(path)!r}) cannot be served: {reason}"
            self._remember_failure(name, signature, message)
            kind = type(exc) if isinstance(exc, LorakitError) else IncompatibleAdapterError
            raise kind(message) from exc
        with self._lock:
            self._failed.pop(name, None)

    def _still_failed(self, name: str, path: Path) -> bool:
        failed = self._failed.get(name)
        return failed is not None and failed[0] == _signature(path)

    def _evict_over_cap(self) -> None:
        if self.max_adapters is None:
            return
        with self._lock:
            victims = []
            for name in list(self._lru):
                if len(self._lru) <= self.max_adapters:
                    break
                if not self._pins.get(name):
                    del self._lru[name]
                    victims.append(name)
            # queued under the lock, so a reload of the name queues after the unload; not awaited (`release` runs
            # on the scheduler thread, which must not wait)
            for name in victims:
                self.run_on_model(lambda n=name: lorakit.delete_adapter(self.model, n))

    # ---- runtime management -------------------------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike | None = None) -> None:
        """Register ``name`` (at ``path``, or its folder in the adapters directory) and load it now.

        ``path`` is relative to the adapters directory (or absolute); unless ``allow_paths``, it must resolve to a
        place inside that directory. Adding a resident adapter again with the same folder is a no-op.

        Raises:
            ConfigError: invalid name, a path outside the adapters directory, or no such folder.
            AdapterExistsError: ``name`` is resident from another folder (DELETE it first).
        """
        folder = self._folder(name, path)
        with self._lock:
            if name in self._lru and self._paths.get(name) not in (None, folder):
                raise AdapterExistsError(
                    f"adapter {name!r} is already loaded from {self.shown(self._paths[name])!r}; DELETE it first"
                )
            previous = self._paths.get(name)
            self._paths[name] = folder
            self._removed.discard(name)
            self._runtime.add(name)
        try:
            self.acquire(name)
        except BaseException:
            with self._lock:
                self._runtime.discard(name)
                self._paths.pop(name, None)
                self._load_locks.pop(name, None)
                if previous is not None:
                    self._paths[name] = previous
            raise
        self.release(name)

    def _folder(self, name: str, path: str | os.PathLike | None) -> Path:
        """The resolved folder `add` would load, after the name and confinement checks."""
        if not self._valid(name):
            raise ConfigError(
                "adapter names are 1 to 64 characters from A-Z a-z 0-9 _ - (no dots, no slashes) and not the base "
                f"model's name {sorted(self.reserved)}; choose another name"
            )
        if path is None and self.directory is None:
            raise ConfigError("this server has no adapters directory (--adapters); give a 'path'")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"'path' must be a string, got {type(path).__name__}")
        base = self.directory if self.directory is not None else Path.cwd()
        folder = (base / (name if path is None else Path(path).expanduser())).resolve()
        hub = path is not None and not folder.exists() and _is_hub_id(str(path))
        if hub:  # a Hub id (only with --allow-hub-adapters): fetched into the HF cache, not a client-chosen folder
            folder = _local_or_hub(path, self.allow_hub)
        elif not self.allow_paths and (self.directory is None or not self._inside(folder)):
            raise ConfigError(
                "'path' must name a folder inside the adapters directory (relative to it); this server was not "
                "started with --allow-adapter-paths"
            )
        if not (folder / CONFIG_NAME).is_file():
            raise ConfigError(f"{self.shown(folder)!r} is not an adapter folder (no {CONFIG_NAME}); check 'path'")
        return folder

    def remove(self, name: str) -> None:
        """Unload ``name`` and stop serving it (a folder in the directory stays unserved until added again).

        Raises:
            AdapterNotFoundError: unknown name.
            AdapterInUseError: requests are using it right now (retry when they finish).
        """
        with self._lock:
            if name not in self._paths and name not in self._lru:
                shown = name if self._valid(name) else "this name"
                raise AdapterNotFoundError(f"adapter {shown!r} not found; servable adapters: {sorted(self._paths)}")
            if self._pins.get(name):
                raise AdapterInUseError(
                    f"adapter {name!r} is in use by {self._pins[name]} request(s); retry when they finish"
                )
            resident = self._lru.pop(name, "absent") != "absent"
            self._paths.pop(name, None)
            self._runtime.discard(name)
            self._load_locks.pop(name, None)
            self._failed.pop(name, None)
            if self.directory is not None and (self.directory / name).is_dir():
                self._removed.add(name)  # only folder names: bounded by the directory
            # queued under the lock: a load of the same name that starts now is queued after it, so it never
            # finds the old copy still in the model ("already loaded")
            unload = self.run_on_model(lambda: lorakit.delete_adapter(self.model, name)) if resident else None
        if unload is not None:
            unload.result()


def _is_hub_id(text: str) -> bool:
    from lorakit.hub import is_hub_id

    return is_hub_id(text)


def _local_or_hub(path: str | os.PathLike, allow_hub: bool) -> Path:
    """A local adapter folder, or (with ``allow_hub``) a Hub id's snapshot folder in the HF cache."""
    from lorakit.hub import is_hub_id
    from lorakit.io.saving import adapter_location

    local = Path(path).expanduser()
    if local.exists() or not is_hub_id(str(path)):
        return local.resolve()
    if not allow_hub:
        raise ConfigError(
            f"{str(path)!r} is not a folder here; to load adapters by Hub id, start the server with "
            f"--allow-hub-adapters (it then downloads them into the Hugging Face cache)"
        )
    return adapter_location(str(path)).resolve()


def _signature(path: Path) -> tuple:
    try:
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in path.iterdir()))
    except OSError:
        return ()
