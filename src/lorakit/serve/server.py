"""Assemble a server (model, registry, batcher, app) and run it with uvicorn."""

from __future__ import annotations

import dataclasses
import logging
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
from lorakit.serve.auth import Keys, check_bind
from lorakit.serve.batcher import Batcher
from lorakit.serve.limits import DEFAULT_MAX_TOKENS, Limits
from lorakit.serve.metrics import Metrics
from lorakit.serve.registry import AdapterRegistry

__all__ = ["DEFAULT_MAX_TOKENS", "build_state", "run", "serve_in_thread"]
_log = logging.getLogger("lorakit.serve")


def build_state(
    model,
    tokenizer,
    *,
    base_name: str,
    adapters_dir: str | os.PathLike | None = None,
    max_adapters: int | None = None,
    max_batch_size: int = 8,
    max_tokens: int | None = None,
    merge: str | None = None,
    limits: Limits | None = None,
    keys: Keys | None = None,
    allow_adapter_paths: bool = False,
    max_queue: int | None = None,
    allow_hub_adapters: bool = False,
    weights: str | None = "fp32",
    prefix_cache_mb: float = 256.0,
    cuda_graphs: bool | None = None,
) -> ServeState:
    """Everything a server needs around a loaded ``(model, tokenizer)``.

    Args:
        model: The base model (eval mode; adapters are loaded into it on demand).
        tokenizer: Its tokenizer.
        base_name: The ``model`` name that selects the bare base model.
        adapters_dir: Folder of adapter sub-folders (servable by folder name).
        max_adapters: Cap on resident adapters (LRU eviction); None: no cap.
        max_batch_size: Most requests decoding together.
        max_tokens: Most tokens one request may ask for (also capped by the context length); overrides ``limits``.
        merge: Serve only this adapter (a folder of ``adapters_dir`` or a path), merged into the base weights.
        limits: Request caps (`Limits`; default: its documented defaults).
        keys: API keys (default: none, for loopback use).
        allow_adapter_paths: Let clients load adapter folders outside ``adapters_dir``.
        max_queue: Most waiting requests; overrides ``limits``.
        allow_hub_adapters: ``POST /v1/adapters`` may name a Hub id as the path (downloaded into the HF cache).
        weights: Decode with the fast engine (`lorakit.inference.DecodeEngine`) over base weights in this format
            (fp32: greedy outputs equal the reference path); None: transformers' forward (the reference path).
            fp32 falls back to the reference path on models the engine cannot run; other formats raise there.
        prefix_cache_mb: The engine's memory for the keys/values of earlier prompts, reused by requests whose
            prompt starts the same way under the same adapter (`lorakit.inference.prefix`); 0: off.
        cuda_graphs: The engine replays decode steps as CUDA graphs (`lorakit.inference.graphs`); None: on for a
            model on CUDA, False: off (True on a CPU model is an error).

    Raises:
        ConfigError: bad sizes or weight format; AdapterNotFoundError / FormatError / IncompatibleAdapterError
            for ``merge``.
    """
    limits = _limits(model, limits or Limits(), max_tokens, max_queue)
    if max_batch_size < 1:
        raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
    model.eval()
    metrics, keys = Metrics(), keys or Keys()
    if not prefix_cache_mb >= 0:
        raise ConfigError(f"prefix_cache_mb must be >= 0 (0: off), got {prefix_cache_mb}")
    options = {"max_batch_size": max_batch_size, "metrics": metrics, "prefix_cache_mb": prefix_cache_mb,
               "cuda_graphs": cuda_graphs}  # fmt: skip
    if merge is not None:
        path = Path(merge) if Path(merge).is_dir() else AdapterRegistry(model, adapters_dir).path(merge)
        name = path.name if Path(merge).is_dir() else merge
        lorakit.load_adapter(model, path, name=name)
        lorakit.set_adapter(model, name)
        lorakit.unload(model, merge=True)  # plain modules again: zero adapter overhead per step
        batcher = Batcher(model, tokenizer, routed=False, weights=_engine_weights(model, weights), **options)
        return ServeState(model, tokenizer, base_name, batcher, metrics, limits, None, merged=name, keys=keys)
    batcher = Batcher(model, tokenizer, routed=True, weights=_engine_weights(model, weights), **options)
    registry = AdapterRegistry(
        model,
        adapters_dir,
        max_adapters=max_adapters,
        run_on_model=batcher.call,
        reserved=(base_name,),
        allow_paths=allow_adapter_paths,
        allow_hub=allow_hub_adapters,
    )
    return ServeState(model, tokenizer, base_name, batcher, metrics, limits, registry, keys=keys)


def _engine_weights(model, weights: str | None) -> str | None:
    """The engine's weight format for ``model``, or None for the reference path (see `build_state`)."""
    from lorakit.inference import WEIGHT_FORMATS, unsupported_reason

    if weights is None:
        return None
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weights={weights!r} is not one of {WEIGHT_FORMATS} (or None: the reference path)")
    reason = unsupported_reason(model)
    if reason is None:
        return weights
    if weights != "fp32":
        raise ConfigError(
            f"--weights {weights} needs the fast decode engine, which cannot run this model ({reason}); "
            "serve it with --weights fp32 or --reference"
        )
    _log.info("lorakit serve: the reference path serves this model (%s)", reason)
    return None


def _limits(model, limits: Limits, max_tokens: int | None, max_queue: int | None) -> Limits:
    """``limits`` with the overrides and the model's context length and vocabulary size filled in."""
    context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    max_tokens = limits.max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    return dataclasses.replace(
        limits,
        context=context,
        vocab_size=vocab,
        max_tokens=min(max_tokens, context - 1),
        max_queue=limits.max_queue if max_queue is None else max_queue,
    )


def run(
    state: ServeState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", no_auth: bool = False
) -> None:
    """Serve until interrupted (uvicorn).

    Raises:
        ConfigError: ``host`` is reachable from other machines, ``state`` has no API keys and ``no_auth`` is False.
    """
    check_bind(host, state.keys, no_auth)
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
