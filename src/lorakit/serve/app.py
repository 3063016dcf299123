"""The HTTP layer: an OpenAI-compatible FastAPI app over one `Batcher` and one `AdapterRegistry`.

Endpoints: POST /v1/completions, POST /v1/chat/completions (``stream: true`` answers with server-sent events in
OpenAI's chunk format, ending with ``data: [DONE]``), GET /v1/models, POST /v1/adapters, DELETE
/v1/adapters/{name}, GET /metrics (Prometheus text), GET /health. Errors use OpenAI's error JSON.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from lorakit.errors import AdapterNotFoundError, ConfigError, LorakitError
from lorakit.serve import protocol
from lorakit.serve.batcher import Batcher, Event, GenRequest
from lorakit.serve.metrics import Metrics
from lorakit.serve.protocol import ApiError, Job, Limits
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.ui import register_ui

_POLL_S = 0.25  # how often a non-streamed request checks whether its client is still there


@dataclass
class ServeState:
    """Everything one server holds: the model, its batcher and registry, limits and counters."""

    model: Any
    tokenizer: Any
    base_name: str
    batcher: Batcher
    metrics: Metrics
    limits: Limits
    registry: AdapterRegistry | None  # None in merged mode
    merged: str | None = None
    runs_dir: Any = None  # a folder of training runs for the web page (--runs)

    def model_names(self) -> list[str]:
        if self.merged is not None:
            return [self.merged]
        return [self.base_name, *self.registry.names()]


def _fastapi():
    try:
        import fastapi
        import fastapi.responses
    except ImportError as exc:
        raise ImportError(f"lorakit serve needs FastAPI and uvicorn ({exc}): pip install 'lorakit[serve]'") from exc
    return fastapi


def create_app(state: ServeState):
    """The FastAPI application; the batcher starts with the app and stops with it."""
    fastapi = _fastapi()
    from contextlib import asynccontextmanager

    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

    @asynccontextmanager
    async def lifespan(_app):
        state.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.batcher.close)

    app = fastapi.FastAPI(title="lorakit serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        state.metrics.http_error(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):  # unknown paths, wrong methods: OpenAI's shape too
        return await _api_error(_request, ApiError(exc.status_code, str(exc.detail)))

    async def generate(request, chat: bool):
        job = protocol.parse(await _json_body(request), state.tokenizer, state.limits, chat=chat)
        adapter = await _acquire(state, job.model, len(job.prompts))
        reqs, queue = _submit(state, job, adapter)
        if job.stream:
            return StreamingResponse(_sse(state, job, reqs, queue), media_type="text/event-stream")
        answer = await _collect(state, job, reqs, queue, request)
        return answer if isinstance(answer, dict) else Response(status_code=499)

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await generate(request, chat=True)

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

    @app.post("/v1/adapters")
    async def add_adapter(request: fastapi.Request):
        body = await _json_body(request)
        registry = _registry(state)
        body = body if isinstance(body, dict) else {}
        name, path = body.get("name"), body.get("path")
        if not isinstance(name, str) or (path is not None and not isinstance(path, str)):
            raise ApiError(
                400, 'send {"name": str, "path": str (optional: a folder of the adapters dir)}', param="name"
            )
        try:
            await asyncio.to_thread(registry.add, name, path)
        except LorakitError as exc:
            raise ApiError(400, str(exc), param="path", code="adapter_load_failed") from exc
        return {"id": name, "object": "model", "resident": True, "parent": state.base_name}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        registry = _registry(state)
        try:
            await asyncio.to_thread(registry.remove, name)
        except AdapterNotFoundError as exc:
            raise ApiError(404, str(exc).strip("\"'"), param="name", code="model_not_found") from exc
        except ConfigError as exc:
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
        return {
            "status": "ok",
            "model": state.base_name,
            "merged": state.merged,
            "resident_adapters": state.registry.resident() if state.registry else [],
            "running": state.batcher.running,
            "queued": state.batcher.queue_depth,
        }

    register_ui(app, state)  # the web page at / and its JSON under /v1/ui
    return app


def _registry(state: ServeState) -> AdapterRegistry:
    if state.registry is None:
        raise ApiError(400, f"this server runs in merged mode (--merge {state.merged}); it cannot load adapters")
    return state.registry


async def _json_body(request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc}); send a JSON object", code="invalid_json"
        ) from exc


async def _acquire(state: ServeState, model: str, count: int) -> str | None:
    """The adapter serving ``model`` (None: the bare or merged base), pinned ``count`` times."""
    if model in (state.base_name, state.merged) and (state.merged is None or model == state.merged):
        return None
    if state.registry is None:
        raise ApiError(
            404,
            f"The model {model!r} does not exist; available models: {state.model_names()}",
            param="model",
            code="model_not_found",
        )
    try:
        for _ in range(count):
            await asyncio.to_thread(state.registry.acquire, model)
    except AdapterNotFoundError as exc:
        raise ApiError(
            404,
            f"The model {model!r} does not exist; available models: {state.model_names()}",
            param="model",
            code="model_not_found",
        ) from exc
    except LorakitError as exc:
        raise ApiError(400, str(exc), param="model", code="adapter_load_failed") from exc
    return model


def _submit(state: ServeState, job: Job, adapter: str | None) -> tuple[list[GenRequest], asyncio.Queue]:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def deliver(index: int, event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    release = (lambda: state.registry.release(adapter)) if adapter is not None else None
    reqs = [
        GenRequest(ids, adapter, job.params, lambda e, i=i: deliver(i, e), release) for i, ids in enumerate(job.prompts)
    ]
    for req in reqs:
        state.batcher.submit(req)
    return reqs, queue


async def _collect(state, job: Job, reqs, queue: asyncio.Queue, request) -> dict | None:
    """Wait for every choice; None if the client went away (its requests are cancelled)."""
    texts, reasons = [""] * len(reqs), [None] * len(reqs)
    prompt = completion = 0
    checked = time.monotonic()
    try:
        while any(r is None for r in reasons):
            try:
                index, event = await asyncio.wait_for(queue.get(), _POLL_S)
            except TimeoutError:
                index, event = None, None
            if time.monotonic() - checked >= _POLL_S:  # tokens may arrive faster than the poll interval
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None
            if event is None:
                continue
            if event.error:
                raise ApiError(500, f"generation failed: {event.error}", code="generation_failed")
            texts[index] += event.text
            if event.finish_reason:
                reasons[index] = event.finish_reason
                prompt, completion = prompt + event.prompt_tokens, completion + event.completion_tokens
    finally:
        for req in reqs:
            if not req.finished:
                state.batcher.cancel(req)
    return protocol.response(job, protocol.new_id(job.chat), texts, reasons, protocol.usage(prompt, completion))


async def _sse(state, job: Job, reqs, queue: asyncio.Queue) -> AsyncIterator[str]:
    """Server-sent events; leaving early (the client disconnected) cancels the unfinished requests."""
    rid, done, prompt, completion = protocol.new_id(job.chat), 0, 0, 0
    try:
        if job.chat:
            for i in range(len(reqs)):
                yield _data(protocol.chunk(job, rid, i, None, None, role=True))
        while done < len(reqs):
            index, event = await queue.get()
            if event.error:
                yield _data(ApiError(500, f"generation failed: {event.error}", code="generation_failed").body())
                break
            if event.text or event.finish_reason:
                yield _data(protocol.chunk(job, rid, index, event.text, event.finish_reason))
            if event.finish_reason:
                done += 1
                prompt, completion = prompt + event.prompt_tokens, completion + event.completion_tokens
        if job.include_usage:
            kind = "chat.completion.chunk" if job.chat else "text_completion"
            yield _data(
                {
                    "id": rid,
                    "object": kind,
                    "created": int(time.time()),
                    "model": job.model,
                    "choices": [],
                    "usage": protocol.usage(prompt, completion),
                }
            )
        yield "data: [DONE]\n\n"
    finally:
        for req in reqs:
            if not req.finished:
                state.batcher.cancel(req)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
