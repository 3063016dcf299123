"""The HTTP layer: an OpenAI-compatible FastAPI app over one `Batcher` and one `AdapterRegistry`.

Endpoints: POST /v1/completions, POST /v1/chat/completions (``stream: true`` answers with server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), GET /v1/models, GET/POST /v1/adapters, DELETE
/v1/adapters/{name}, GET /metrics (Prometheus text), GET /health. Errors use OpenAI's error JSON. With API keys
configured, every endpoint but /health (and the web page's static files) needs ``Authorization: Bearer KEY``
(`lorakit.serve.auth`).

Routes come in groups, each a ``register(app, state)`` function in its own module; `ROUTE_GROUPS` lists them,
so an extra group (a web page) is one more entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from lorakit.serve.auth import KeyCheck, Keys
from lorakit.serve.batcher import Batcher
from lorakit.serve.metrics import Metrics
from lorakit.serve.protocol import ApiError, Limits
from lorakit.serve.registry import AdapterRegistry


@dataclass
class ServeState:
    """Everything one server holds: the model, its batcher and registry, limits, keys and counters."""

    model: Any
    tokenizer: Any
    base_name: str
    batcher: Batcher
    metrics: Metrics
    limits: Limits
    registry: AdapterRegistry | None  # None in merged mode
    merged: str | None = None
    keys: Keys = field(default_factory=Keys)
    runs_dir: Any = None  # a folder of training runs for the web page (--runs)

    def model_names(self) -> list[str]:
        if self.merged is not None:
            return [self.merged]
        return [self.base_name, *self.registry.names()]

    def not_found(self, model: str) -> ApiError:
        """The 404 for an unknown ``model`` (OpenAI's wording), listing what is served."""
        shown = model if len(model) <= 100 else model[:100] + "..."
        return ApiError(
            404,
            f"The model {shown!r} does not exist; available models: {self.model_names()}",
            param="model",
            code="model_not_found",
        )


def _fastapi():
    try:
        import fastapi
        import fastapi.responses
    except ImportError as exc:
        raise ImportError(f"lorakit serve needs FastAPI and uvicorn ({exc}): pip install 'lorakit[serve]'") from exc
    return fastapi


def _route_groups() -> list[Callable[[Any, ServeState], None]]:
    from lorakit.serve import generate, manage
    from lorakit.serve.ui import register_ui  # the web page at / and its JSON under /v1/ui

    return [generate.register, manage.register, register_ui]


def create_app(state: ServeState):
    """The FastAPI application (wrapped in the API-key check); the batcher starts and stops with it."""
    fastapi = _fastapi()

    @asynccontextmanager
    async def lifespan(_app):
        state.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.batcher.close)

    app = fastapi.FastAPI(title="lorakit serve", lifespan=lifespan)
    _add_error_handlers(app, state)
    for register in _route_groups():
        register(app, state)
    app.add_middleware(KeyCheck, keys=state.keys, on_reject=state.metrics.http_error)
    return app


def _add_error_handlers(app, state: ServeState) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def api_error(_request, exc: ApiError):
        state.metrics.http_error(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request, exc: HTTPException):  # unknown paths, wrong methods: OpenAI's shape too
        return await api_error(request, ApiError(exc.status_code, str(exc.detail)))

    async def validation_error(request, exc: RequestValidationError):
        return await api_error(request, ApiError(400, f"invalid request: {exc.errors()[:3]}"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
