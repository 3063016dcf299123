"""The web page of `lorakit serve` (and of ``lorakit ui RUNS_DIR``): static files plus the JSON they need.

The page (``/`` and ``/ui/*``: plain HTML, CSS and JavaScript shipped in ``lorakit/serve/static``, no build step,
nothing from a CDN) needs no key to load; everything it shows comes from the server's API, sent with the key the
user typed in the page. Besides the OpenAI-compatible endpoints it reads these, which sit under ``/v1`` with the
rest of the API (and so behind the same keys):

- ``GET /v1/ui/info``: what this server offers (base model, adapters, runs).
- ``GET /v1/ui/adapters``: one card per adapter folder (`lorakit.serve.cards.adapter_card`) and its status.
- ``GET /v1/ui/adapters/{name}/spectrum``: the ``lorakit inspect`` report of one adapter.
- ``GET /v1/ui/runs``: the training runs under ``--runs`` with their configs and eval tables.
- ``GET /v1/ui/runs/metrics?run=NAME&offset=BYTES``: new ``metrics.jsonl`` records of a run since ``offset``.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.io.peft_format import CONFIG_NAME
from lorakit.serve.cards import SpectrumCache, adapter_card
from lorakit.serve.protocol import ApiError
from lorakit.serve.runs import find_runs, read_metrics, run_summary

STATIC_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


def is_public_path(path: str) -> bool:
    """Whether ``path`` is part of the static page, which an auth layer lets through without a key (no data in it)."""
    return path == "/" or path.startswith("/ui/")


def static_files() -> dict[str, bytes]:
    """The page's files by name, read from the installed package (``lorakit/serve/static``)."""
    folder = resources.files("lorakit.serve") / "static"
    return {p.name: p.read_bytes() for p in folder.iterdir() if Path(p.name).suffix in STATIC_TYPES}


def register_ui(app: Any, state: Any = None, runs_dir: str | Path | None = None) -> None:
    """Add the page and its JSON endpoints to a FastAPI ``app``.

    Args:
        app: The FastAPI application.
        state: The server's `ServeState` (None: a runs-only page, ``lorakit ui``); its ``runs_dir`` attribute, when
            set, is the runs folder.
        runs_dir: The folder of training runs (overrides ``state.runs_dir``); None: no runs view.
    """
    from fastapi.responses import Response

    files = static_files()

    def runs_root() -> Path | None:  # read per request: the server may set state.runs_dir after building the app
        root = runs_dir if runs_dir is not None else getattr(state, "runs_dir", None)
        return Path(root) if root is not None else None

    spectra = SpectrumCache()

    def asset(name: str) -> Response:
        body = files.get(name)
        if body is None:
            raise ApiError(404, f"no file {name!r} in the web page; files: {sorted(files)}", code="not_found")
        media = STATIC_TYPES[Path(name).suffix]
        return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def page():
        return asset("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str):
        return asset(name)

    @app.get("/v1/ui/info")
    async def info():
        serving = state is not None
        return {
            "base": state.base_name if serving else None,
            "merged": state.merged if serving else None,
            "adapters": serving and state.registry is not None,
            "runs": str(runs_root()) if runs_root() is not None else None,
        }

    @app.get("/v1/ui/adapters")
    async def adapters():
        return {"data": await asyncio.to_thread(_adapter_cards, state)}

    @app.get("/v1/ui/adapters/{name}/spectrum")
    async def spectrum(name: str):
        folder = _adapter_folders(state).get(name)
        if folder is None:
            raise ApiError(404, f"no adapter folder {name!r}; adapters: {sorted(_adapter_folders(state))}")
        try:
            return await asyncio.to_thread(spectra.get, folder)
        except LorakitError as exc:
            raise ApiError(400, f"adapter {name!r} cannot be inspected: {exc}", code="adapter_unreadable") from exc

    @app.get("/v1/ui/runs")
    async def runs():
        root = _runs_root(runs_root())
        found = await asyncio.to_thread(find_runs, root)
        data = await asyncio.to_thread(lambda: [run_summary(n, p) for n, p in found.items()])
        return {"root": str(root), "data": data}

    @app.get("/v1/ui/runs/metrics")
    async def metrics(run: str, offset: int = 0):
        root = _runs_root(runs_root())
        found = await asyncio.to_thread(find_runs, root)
        if run not in found:
            raise ApiError(404, f"no run {run!r} in {str(root)!r}; runs: {sorted(found)[:20]}", param="run")
        if offset < 0:
            raise ApiError(400, f"offset must be >= 0, got {offset}", param="offset")
        page = await asyncio.to_thread(read_metrics, found[run] / "metrics.jsonl", offset)
        return {"run": run, "records": page.records, "offset": page.offset, "size": page.size}


def _runs_root(root: Path | None) -> Path:
    if root is None:
        raise ApiError(404, "this server has no runs folder; start it with --runs DIR", code="no_runs")
    if not root.is_dir():
        raise ApiError(404, f"the runs folder {str(root)!r} does not exist (any more)", code="no_runs")
    return root


def _adapter_folders(state: Any) -> dict[str, Path]:
    """Adapter name -> folder: the adapters directory's sub-folders and adapters added at run time."""
    registry = getattr(state, "registry", None)
    if registry is None:
        return {}
    found: dict[str, Path] = {}
    if registry.directory is not None and registry.directory.is_dir():
        for sub in sorted(registry.directory.iterdir()):
            if (sub / CONFIG_NAME).is_file() and not sub.name.startswith("."):
                found[sub.name] = sub
    for name in registry.names():
        try:
            found[name] = registry.path(name)
        except LorakitError:
            continue
    return found


def _adapter_cards(state: Any) -> list[dict[str, Any]]:
    registry = getattr(state, "registry", None)
    if registry is None:
        return []
    servable, resident = set(registry.names()), set(registry.resident())
    cards = []
    for name, folder in _adapter_folders(state).items():
        card = adapter_card(name, folder)
        card["status"] = "loaded" if name in resident else "servable" if name in servable else "not served"
        cards.append(card)
    return cards


def create_ui_app(runs_dir: str | Path) -> Any:
    """A server with the runs view alone (``lorakit ui RUNS_DIR``): no model, no generation endpoints."""
    try:
        import fastapi
        from fastapi.responses import JSONResponse
    except ImportError as exc:
        raise ImportError(f"lorakit ui needs FastAPI and uvicorn ({exc}): pip install 'lorakit[serve]'") from exc
    from starlette.exceptions import HTTPException

    app = fastapi.FastAPI(title="lorakit ui")

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    register_ui(app, None, runs_dir)
    return app


def register(app: Any, state: Any) -> None:
    """The page as one route group of `lorakit.serve.app` (same signature as the other groups' ``register``)."""
    register_ui(app, state)
