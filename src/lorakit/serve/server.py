"""Assemble a server (model, registry, batcher, app) and run it with uvicorn."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lorakit
from lorakit.errors import ConfigError
from lorakit.serve.app import ServeState, create_app
from lorakit.serve.batcher import Batcher
from lorakit.serve.metrics import Metrics
from lorakit.serve.protocol import Limits
from lorakit.serve.registry import AdapterRegistry

DEFAULT_MAX_TOKENS = 4096


def build_state(
    model,
    tokenizer,
    *,
    base_name: str,
    adapters_dir: str | os.PathLike | None = None,
    max_adapters: int | None = None,
    max_batch_size: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    merge: str | None = None,
    weights: str = "fp32",
    fast: bool = True,
    allow_hub_adapters: bool = False,
) -> ServeState:
    """Everything a server needs around a loaded ``(model, tokenizer)``.

    Args:
        model: The base model (eval mode; adapters are loaded into it on demand).
        tokenizer: Its tokenizer.
        base_name: The ``model`` name that selects the bare base model.
        adapters_dir: Folder of adapter sub-folders (servable by folder name).
        max_adapters: Cap on resident adapters (LRU eviction); None: no cap.
        max_batch_size: Most requests decoding together.
        max_tokens: Most tokens one request may ask for (also capped by the context length).
        merge: Serve only this adapter (a folder of ``adapters_dir`` or a path), merged into the base weights.
        weights: Base weight format of the fast decode engine (`lorakit.inference.weights.WEIGHT_FORMATS`).
        fast: Run forward passes on the fast decode engine where the model supports it (the default; greedy
            outputs equal the transformers path in fp32); False: the transformers forward.
        allow_hub_adapters: ``POST /v1/adapters`` may name a Hub id as the path (downloaded into the HF cache).

    Raises:
        ConfigError: bad sizes; AdapterNotFoundError / FormatError / IncompatibleAdapterError for ``merge``.
    """
    if max_batch_size < 1 or max_tokens < 1:
        raise ConfigError(f"max_batch_size and max_tokens must be >= 1, got {max_batch_size} and {max_tokens}")
    model.eval()
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    limits = Limits(context=context, max_tokens=min(max_tokens, context - 1))
    metrics = Metrics()
    if merge is not None:
        path = Path(merge) if Path(merge).is_dir() else AdapterRegistry(model, adapters_dir).path(merge)
        name = path.name if Path(merge).is_dir() else merge
        lorakit.load_adapter(model, path, name=name)
        lorakit.set_adapter(model, name)
        lorakit.unload(model, merge=True)  # plain modules again: zero adapter overhead per step
        batcher = _batcher(model, tokenizer, fast, weights, context, max_batch_size=max_batch_size, routed=False,
                           metrics=metrics)  # fmt: skip
        return ServeState(model, tokenizer, base_name, batcher, metrics, limits, None, merged=name)
    batcher = _batcher(model, tokenizer, fast, weights, context, max_batch_size=max_batch_size, metrics=metrics)
    registry = AdapterRegistry(
        model,
        adapters_dir,
        max_adapters=max_adapters,
        run_on_model=batcher.call,
        reserved=(base_name,),
        allow_hub=allow_hub_adapters,
    )
    return ServeState(model, tokenizer, base_name, batcher, metrics, limits, registry)


def _batcher(model, tokenizer, fast: bool, weights: str, context: int, **kwargs) -> Batcher:
    """A `FastBatcher` over a `DecodeEngine` when ``fast`` and the model allows it, else the transformers `Batcher`."""
    from lorakit.inference import DecodeEngine, unsupported_reason

    reason = unsupported_reason(model)
    if weights != "fp32" and (reason is not None or not fast):
        raise ConfigError(f"weights={weights!r} needs the fast decode path, which is off or cannot run this model "
                          f"({reason or 'fast=False'}); serve with fp32 weights")  # fmt: skip
    if not fast or reason is not None:
        return Batcher(model, tokenizer, **kwargs)
    from lorakit.serve.fast import FastBatcher

    engine = DecodeEngine(model, weights=weights, max_batch=kwargs["max_batch_size"], max_len=context)
    return FastBatcher(model, tokenizer, engine=engine, **kwargs)


def run(state: ServeState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn)."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"lorakit serve needs uvicorn ({exc}): pip install 'lorakit[serve]'") from exc
    uvicorn.run(create_app(state), host=host, port=port, log_level=log_level)


@contextmanager
def serve_in_thread(state: ServeState, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the server in a background thread (port 0: a free port); yields its base URL and stops it on exit.

    For tests, benchmarks and notebooks; the socket is bound before the thread starts, so there is no race for
    the port.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lorakit-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the server on {host}:{sock.getsockname()[1]} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
