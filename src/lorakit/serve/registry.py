"""Which adapters a server can serve, which are in memory, and the LRU cap on resident adapters.

Every sub-folder of the adapters directory that holds ``adapter_config.json`` is servable under its folder
name; the folder is read and loaded (`lorakit.load_adapter`) into the one base model on first use. A name not
known yet triggers a rescan, so folders dropped in later are served without a restart. A folder that fails to
load (corrupt, or made for another base) is refused with the loader's message and remembered until its files
change; the model is left as it was, so every other adapter keeps serving.

Model changes (load, delete) are handed to ``run_on_model`` (the batcher's `call`), which runs them between
forward passes on the scheduler thread; reading and validating the files happens before, on the caller's thread,
so a slow disk does not stall requests that use other adapters.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import lorakit
from lorakit.errors import AdapterNotFoundError, ConfigError, IncompatibleAdapterError, LorakitError
from lorakit.io.atomic import read_adapter_dir
from lorakit.io.peft_format import CONFIG_NAME


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
        allow_hub: `add` accepts a Hub id (``org/adapter``) as the path and fetches it into the HF cache.
    """

    def __init__(
        self,
        model,
        directory: str | os.PathLike | None = None,
        *,
        max_adapters: int | None = None,
        run_on_model: Callable[[Callable[[], object]], Future] = _run_here,
        reserved: tuple[str, ...] = (),
        allow_hub: bool = False,
    ) -> None:
        if max_adapters is not None and max_adapters < 1:
            raise ConfigError(f"max_adapters must be at least 1 (or None for no cap), got {max_adapters}")
        self.model, self.max_adapters, self.run_on_model = model, max_adapters, run_on_model
        self.directory = Path(directory) if directory is not None else None
        self.reserved = set(reserved)
        self.allow_hub = allow_hub
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}
        self._runtime: set[str] = set()  # added through `add`: kept across rescans
        self._removed: set[str] = set()  # deleted through `remove`: rescans skip them until added again
        self._failed: dict[str, tuple[tuple, str]] = {}  # name -> (files signature, error message)
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident adapters, least recently used first
        self._pins: Counter[str] = Counter()
        self._load_locks: dict[str, threading.Lock] = {}
        self.scan()

    # ---- discovery ----------------------------------------------------------------------------------------
    def scan(self) -> None:
        """Re-read the adapters directory (new folders become servable, vanished ones are forgotten)."""
        found: dict[str, Path] = {}
        if self.directory is not None and self.directory.is_dir():
            for sub in sorted(self.directory.iterdir()):
                name = sub.name
                if (sub / CONFIG_NAME).is_file() and self._valid(name) and name not in self._removed:
                    found[name] = sub
        with self._lock:
            runtime = {n: self._paths[n] for n in self._runtime if n in self._paths}
            self._paths = {**found, **runtime}

    def _valid(self, name: str) -> bool:
        return bool(name) and not name.startswith(".") and "." not in name and name not in self.reserved

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
            raise AdapterNotFoundError(f"adapter {name!r} not found; servable adapters: {self.names()}")
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
        if self._still_failed(name, path):
            raise IncompatibleAdapterError(self._failed[name][1])
        signature = _signature(path)
        try:
            read_adapter_dir(path)  # corrupt files fail here, off the scheduler thread
            self.run_on_model(lambda: lorakit.load_adapter(self.model, path, name=name)).result()
        except LorakitError as exc:
            message = f"adapter {name!r} at {str(path)!r} cannot be served: {exc}"
            self._failed[name] = (signature, message)
            raise type(exc)(message) from exc
        except Exception as exc:  # noqa: BLE001 - torch/safetensors errors become one clear refusal
            message = f"adapter {name!r} at {str(path)!r} cannot be served: {type(exc).__name__}: {exc}"
            self._failed[name] = (signature, message)
            raise IncompatibleAdapterError(message) from exc
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
        for name in victims:  # queued, not awaited: `release` runs on the scheduler thread, which must not wait
            self.run_on_model(lambda n=name: lorakit.delete_adapter(self.model, n))

    # ---- runtime management -------------------------------------------------------------------------------
    def add(self, name: str, path: str | os.PathLike | None = None) -> None:
        """Register ``name`` (at ``path``, or its folder in the adapters directory) and load it now.

        Raises:
            ConfigError: invalid name, or no path and no such folder in the directory.
            AdapterExistsError-like errors are not raised: adding a resident adapter with the same path is a no-op.
        """
        if not self._valid(name):
            raise ConfigError(
                f"adapter name {name!r} is invalid: use a non-empty name without '.' that is not the base model's "
                f"name ({sorted(self.reserved)})"
            )
        if path is None:
            if self.directory is None or not (self.directory / name / CONFIG_NAME).is_file():
                raise ConfigError(f"no 'path' given and no folder {name!r} with {CONFIG_NAME} in {self.directory}")
            path = self.directory / name
        path = _local_or_hub(path, self.allow_hub)
        with self._lock:
            if name in self._lru and self._paths.get(name) not in (None, path):
                raise ConfigError(f"adapter {name!r} is already loaded from {self._paths[name]}; DELETE it first")
            previous = self._paths.get(name)
            self._paths[name] = path
            self._removed.discard(name)
            self._runtime.add(name)
        try:
            self.acquire(name)
        except BaseException:
            with self._lock:
                self._runtime.discard(name)
                self._paths.pop(name, None)
                if previous is not None:
                    self._paths[name] = previous
            raise
        self.release(name)

    def remove(self, name: str) -> None:
        """Unload ``name`` and stop serving it (a folder in the directory stays unserved until added again).

        Raises:
            AdapterNotFoundError: unknown name.
            ConfigError: requests are using it right now (retry when they finish).
        """
        with self._lock:
            if name not in self._paths and name not in self._lru:
                raise AdapterNotFoundError(f"adapter {name!r} not found; servable adapters: {sorted(self._paths)}")
            if self._pins.get(name):
                raise ConfigError(f"adapter {name!r} is in use by {self._pins[name]} request(s); retry when done")
            resident = self._lru.pop(name, "absent") != "absent"
            self._paths.pop(name, None)
            self._runtime.discard(name)
            self._removed.add(name)
        if resident:
            self.run_on_model(lambda: lorakit.delete_adapter(self.model, name)).result()


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
