"""``lorakit serve``: one base model, many adapters, an OpenAI-compatible HTTP API (see `lorakit.serve`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lorakit.cli.options import WEIGHT_FORMATS
from lorakit.serve.limits import Limits

_DEFAULTS = Limits()

HELP = "serve a base model and its adapters over an OpenAI-compatible API"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="base model: embedded name (default), Hub id (Org/Name), HF folder or .gguf file"
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit sha of a Hub id --model")
    parser.add_argument(
        "--allow-hub-adapters",
        action="store_true",
        help="POST /v1/adapters may name a Hub id (org/adapter) as its path; it is downloaded into the HF cache",
    )
    parser.add_argument("--adapters", default=None, help="folder whose sub-folders are PEFT adapters (served by name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-adapters", type=int, default=None, help="most adapters in memory (LRU eviction)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="most requests decoding together (default 8)")
    parser.add_argument("--merge", default=None, metavar="NAME", help="serve only adapter NAME merged into the base")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bf16, fp16 or auto")
    parser.add_argument(
        "--weights",
        default="fp32",
        choices=WEIGHT_FORMATS,
        help="base weight format of the fast decode engine (default fp32: same greedy outputs as --reference; "
        "adapters stay fp32; agreement of the others in the README)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256.0,
        help="memory for the keys/values of earlier prompts, reused by requests that start the same way (the chat "
        "template, a system prompt) under the same adapter (default 256; 0: off)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="on a GPU, run each decode step's kernels one by one instead of replaying a captured CUDA graph "
        "(graphs are on by default there; they are several times faster: README)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="decode with transformers' forward instead of the fast engine (the reference path)",
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--runs", default=None, metavar="DIR", help="folder of training runs shown on the web page")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    _add_security_args(parser.add_argument_group("keys and confinement"))
    _add_limit_args(parser.add_argument_group("limits (each request; 0 or less is refused)"))


def _add_security_args(group) -> None:
    group.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept 'Authorization: Bearer KEY' (repeatable; also $LORAKIT_API_KEY)",
    )
    group.add_argument(
        "--admin-key",
        action="append",
        default=[],
        metavar="KEY",
        help="only these keys may load or delete adapters (repeatable)",
    )
    group.add_argument(
        "--no-auth",
        action="store_true",
        help="allow a non-loopback --host without any key (on purpose: a trusted network only)",
    )
    group.add_argument("--allow-adapter-paths", action="store_true",
                       help="let POST /v1/adapters load folders outside --adapters (trusted clients only)")  # fmt: skip


def _add_limit_args(group) -> None:
    d = _DEFAULTS
    group.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"tokens per request ({d.max_tokens})")
    group.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help=f"request body size ({d.max_body_bytes})"
    )
    group.add_argument("--max-prompts", type=int, default=d.max_prompts, help=f"prompts per request ({d.max_prompts})")
    group.add_argument("--max-n", type=int, default=d.max_n, help=f"choices per prompt, n ({d.max_n})")
    group.add_argument("--max-stops", type=int, default=d.max_stops, help=f"stop strings ({d.max_stops})")
    group.add_argument(
        "--max-stop-chars", type=int, default=d.max_stop_chars, help=f"characters per stop string ({d.max_stop_chars})"
    )
    group.add_argument(
        "--max-queue", type=int, default=d.max_queue, help=f"waiting requests before 429 ({d.max_queue})"
    )
    group.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                       help=f"seconds before a request is cancelled with 504 ({d.request_timeout_s:g})")  # fmt: skip


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes, max_prompts=args.max_prompts,
        max_n=args.max_n, max_stops=args.max_stops, max_stop_chars=args.max_stop_chars, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.errors import ConfigError
    from lorakit.models import default_model_name, load_model, resolve_model_source
    from lorakit.serve.auth import Keys, check_bind
    from lorakit.serve.server import build_state
    from lorakit.serve.server import run as serve

    if args.reference and args.weights != "fp32":
        raise ConfigError(f"--weights {args.weights} is a format of the fast engine; --reference runs the model as "
                          "loaded (see --dtype): give one of the two")  # fmt: skip
    if not args.prefix_cache_mb >= 0:
        raise ConfigError(f"--prefix-cache-mb must be >= 0 (0 turns the prefix cache off), got {args.prefix_cache_mb}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}; leave it out for torch's choice")
    env_key = os.environ.get("LORAKIT_API_KEY")
    keys = Keys(api=tuple(args.api_key) + ((env_key,) if env_key else ()), admin=tuple(args.admin_key))
    check_bind(args.host, keys, args.no_auth)
    limits = _limits(args)
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters!r} is not a folder; give a folder of adapter sub-folders")
    if args.runs is not None and not Path(args.runs).is_dir():
        raise ConfigError(f"--runs {args.runs!r} is not a folder; give the folder your training runs are written to")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.model or default_model_name()
    source = resolve_model_source(name, args.revision)
    base_name = source.name if source.kind == "embedded" else Path(source.name).name
    model, tokenizer = load_model(name, revision=args.revision, dtype=args.dtype, device=args.device)
    state = build_state(
        model, tokenizer, base_name=base_name, adapters_dir=args.adapters, max_adapters=args.max_adapters,
        max_batch_size=args.max_batch_size, merge=args.merge, limits=limits, keys=keys,
        allow_adapter_paths=args.allow_adapter_paths, allow_hub_adapters=args.allow_hub_adapters,
        weights=None if args.reference else args.weights, prefix_cache_mb=args.prefix_cache_mb,
        cuda_graphs=False if args.no_cuda_graphs else None,
    )  # fmt: skip
    state.runs_dir = Path(args.runs) if args.runs is not None else None
    served = state.model_names()
    print(f"lorakit serve: http://{args.host}:{args.port}/v1 models: {served[:10]}{' ...' if len(served) > 10 else ''}")
    serve(state, args.host, args.port, args.log_level, no_auth=args.no_auth)
    return 0
