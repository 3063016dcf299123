"""``lorakit ui RUNS_DIR``: the web page's runs view alone (training curves, eval tables, configs), no model loaded."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "the web page's runs view alone: training curves, eval tables, configs"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", metavar="RUNS_DIR", help="folder of training runs (or one run, or a sweep folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level")


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import ConfigError
    from lorakit.serve.ui import create_ui_app

    if not Path(args.runs).is_dir():
        raise ConfigError(f"RUNS_DIR {args.runs!r} is not a folder; give the folder your training runs are written to")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f"lorakit ui needs uvicorn ({exc}): pip install 'lorakit[serve]'") from exc
    app = create_ui_app(args.runs)
    print(f"lorakit ui: http://{args.host}:{args.port}/ (runs in {args.runs})")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
