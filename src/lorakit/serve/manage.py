"""Model and adapter management, and the server's own state: /v1/models, /v1/adapters, /metrics, /health.

/v1/models lists what can be served right now (the base and every adapter whose files look loadable);
GET /v1/adapters lists every adapter folder the server knows, broken ones with their error.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse

from lorakit.errors import AdapterExistsError, AdapterInUseError, AdapterNotFoundError, LorakitError
from lorakit.serve import schemas
from lorakit.serve.generate import json_body
from lorakit.serve.protocol import ApiError
from lorakit.serve.registry import AdapterRegistry


def register(app, state) -> None:
    """Add the model, adapter, metrics and health endpoints to ``app``."""

    @app.get("/v1/models")
    async def models():
        resident = set(state.registry.resident()) if state.registry else set()
        created = int(state.metrics.started_wall)
        data = [
            {
                "id": n,
                "object": "model",
                "created": created,
                "owned_by": "lorakit",
                "root": state.base_name,
                "parent": None if n == state.base_name else state.base_name,
                "resident": n in resident or n in (state.base_name, state.merged),
            }
            for n in state.model_names()
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": state.registry.status() if state.registry else []}

    @app.post("/v1/adapters", openapi_extra=schemas.body(schemas.ADD_ADAPTER))
    async def add_adapter(request: Request):
        name, path = _adapter_body(await json_body(request, state.limits.max_body_bytes))
        registry = _registry(state)
        try:
            await asyncio.to_thread(registry.add, name, path)
        except AdapterExistsError as exc:
            raise ApiError(409, str(exc), param="name", code="adapter_exists") from exc
        except LorakitError as exc:
            raise ApiError(400, str(exc), param="path", code="adapter_load_failed") from exc
        return {"id": name, "object": "model", "resident": True, "parent": state.base_name}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        registry = _registry(state)
        try:
            await asyncio.to_thread(registry.remove, name)
        except AdapterNotFoundError as exc:
            raise ApiError(404, str(exc), param="name", code="model_not_found") from exc
        except AdapterInUseError as exc:
            raise ApiError(409, str(exc), param="name", code="adapter_in_use") from exc
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/metrics")
    async def metrics():
        resident = state.registry.resident() if state.registry else []
        text = state.metrics.render(
            queue_depth=state.batcher.queue_depth, running=state.batcher.running, resident=resident
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        alive = state.batcher.alive
        body = {
            "status": "ok" if alive else "error",
            "error": None if alive else f"the scheduler has stopped ({state.batcher.failure})",
            "model": state.base_name,
            "merged": state.merged,
            "resident_adapters": state.registry.resident() if state.registry else [],
            "running": state.batcher.running,
            "queued": state.batcher.queue_depth,
        }
        return JSONResponse(body, status_code=200 if alive else 503)


def _adapter_body(body) -> tuple[str, str | None]:
    body = body if isinstance(body, dict) else {}
    name, path = body.get("name"), body.get("path")
    if not isinstance(name, str) or (path is not None and not isinstance(path, str)):
        raise ApiError(
            400, 'send {"name": str, "path": str (optional: a folder inside the adapters dir)}', param="name"
        )
    return name, path


def _registry(state) -> AdapterRegistry:
    if state.registry is None:
        raise ApiError(400, f"this server runs in merged mode (--merge {state.merged}); it cannot load adapters")
    return state.registry
