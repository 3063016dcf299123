"""``lorakit serve``: one base model, many adapters, an OpenAI-compatible HTTP API (see `lorakit.serve`)."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    parser.add_argument("--max-tokens", type=int, default=4096, help="most tokens one request may ask for")
    parser.add_argument("--merge", default=None, metavar="NAME", help="serve only adapter NAME merged into the base")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bf16, fp16 or auto")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: CPU)")
    parser.add_argument(
        "--weights",
        default="fp32",
        choices=["fp32", "bf16", "int8", "int4", "nf4"],
        help="base weight format of the fast decode path (adapters stay fp32; default fp32)",
    )
    parser.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fast decode engine where the model supports it (default on; --no-fast: transformers)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--runs", default=None, metavar="DIR", help="folder of training runs shown on the web page")
    parser.add_argument("--log-level", default="info", help="uvicorn log level")


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.errors import ConfigError
    from lorakit.models import default_model_name, load_model, resolve_model_source
    from lorakit.serve.server import build_state
    from lorakit.serve.server import run as serve

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters!r} is not a folder; give a folder of adapter sub-folders")
    if args.runs is not None and not Path(args.runs).is_dir():
        raise ConfigError(f"--runs {args.runs!r} is not a folder; give the folder your training runs are written to")
    name = args.model or default_model_name()
    source = resolve_model_source(name, args.revision)
    base_name = source.name if source.kind == "embedded" else Path(source.name).name
    model, tokenizer = load_model(name, revision=args.revision, dtype=args.dtype, device=args.device)
    state = build_state(
        model,
        tokenizer,
        base_name=base_name,
        adapters_dir=args.adapters,
        max_adapters=args.max_adapters,
        max_batch_size=args.max_batch_size,
        max_tokens=args.max_tokens,
        merge=args.merge,
        weights=args.weights,
        fast=args.fast,
        allow_hub_adapters=args.allow_hub_adapters,
    )
    state.runs_dir = Path(args.runs) if args.runs is not None else None
    served = state.model_names()
    print(f"lorakit serve: http://{args.host}:{args.port}/v1 models: {served[:10]}{' ...' if len(served) > 10 else ''}")
    serve(state, args.host, args.port, args.log_level)
    return 0
