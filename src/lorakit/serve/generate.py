"""POST /v1/completions and /v1/chat/completions: validate, pin the adapter, queue, answer whole or streamed.

Every request is bounded: its body (413), its queue slot (429 with ``Retry-After`` when the queue is full) and
its time (`Limits.request_timeout_s`: 504, or an error event when streaming). Whatever happens, the adapter pins
taken for it are released exactly once: by the scheduler when a request finishes, or here when it never got
queued.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from lorakit.errors import AdapterNotFoundError, LorakitError, ServeError
from lorakit.serve import protocol, schemas
from lorakit.serve.batcher import Event, GenRequest
from lorakit.serve.mailbox import Mailbox
from lorakit.serve.protocol import ApiError, Job

_POLL_S = 0.25  # how often a non-streamed request checks whether its client is still there


def register(app, state) -> None:
    """Add the two generation endpoints to ``app``."""

    @app.post("/v1/completions", openapi_extra=schemas.body(schemas.bounded(schemas.COMPLETION, state.limits)))
    async def completions(request: Request):
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=schemas.body(schemas.bounded(schemas.CHAT, state.limits)))
    async def chat_completions(request: Request):
        return await _generate(state, request, chat=True)


async def _generate(state, request, chat: bool):
    from fastapi.responses import Response, StreamingResponse

    job = protocol.parse(
        await json_body(request, state.limits.max_body_bytes), state.tokenizer, state.limits, chat=chat
    )
    _check_room(state, len(job.prompts))
    adapter = await _acquire(state, job.model, len(job.prompts))
    reqs, mailbox = _submit(state, job, adapter)
    deadline = time.monotonic() + state.limits.request_timeout_s
    if job.stream:
        return StreamingResponse(_sse(state, job, reqs, mailbox, deadline), media_type="text/event-stream")
    answer = await _collect(state, job, reqs, mailbox, request, deadline)
    return answer if isinstance(answer, dict) else Response(status_code=499)


async def json_body(request, limit: int) -> Any:
    """The request body parsed as JSON; 413 above ``limit`` bytes (checked while reading, not after)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc}); send a JSON object", code="invalid_json"
        ) from exc


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body has at least {size} bytes; this server takes at most {limit} bytes "
        "(set with --max-body-bytes)",
        code="request_too_large",
    )


def _check_room(state, count: int) -> None:
    if not state.batcher.alive:
        raise ApiError(503, f"the scheduler has stopped ({state.batcher.failure}); restart the server")
    waiting = state.batcher.queue_depth
    if waiting + count > state.limits.max_queue:
        raise ApiError(
            429,
            f"the server is busy: {waiting} requests wait for a batch slot (at most {state.limits.max_queue}, "
            "set with --max-queue); retry after a moment",
            code="queue_full",
            kind="rate_limit_error",
            headers={"Retry-After": "1"},
        )


async def _acquire(state, model: str, count: int) -> str | None:
    """The adapter serving ``model`` (None: the bare or merged base), pinned ``count`` times."""
    if model in (state.base_name, state.merged) and (state.merged is None or model == state.merged):
        return None
    if state.registry is None:
        raise state.not_found(model)
    taken = 0
    try:
        for _ in range(count):
            await asyncio.to_thread(state.registry.acquire, model)
            taken += 1
    except AdapterNotFoundError as exc:
        raise state.not_found(model) from exc
    except LorakitError as exc:
        raise ApiError(400, str(exc), param="model", code="adapter_load_failed") from exc
    finally:
        if taken < count:  # a later acquire failed: give back the pins already taken
            for _ in range(taken):
                state.registry.release(model)
    return model


def _submit(state, job: Job, adapter: str | None) -> tuple[list[GenRequest], Mailbox]:
    mailbox = Mailbox(asyncio.get_running_loop())

    release = (lambda: state.registry.release(adapter)) if adapter is not None else None
    reqs = [
        GenRequest(ids, adapter, params, lambda e, i=i: mailbox.put((i, e)), release)
        for i, (ids, params) in enumerate(zip(job.prompts, job.params, strict=True))
    ]
    for k, req in enumerate(reqs):
        try:
            state.batcher.submit(req)
        except ServeError as exc:  # the scheduler stopped: the queued ones get its error, these never ran
            for rest in reqs[k:]:
                if release is not None:
                    release()
                rest.finished = True
            for done in reqs[:k]:
                state.batcher.cancel(done)
            raise ApiError(503, str(exc), code="server_stopped") from exc
    return reqs, mailbox


def _event_error(event: Event) -> ApiError:
    if event.fatal:
        return ApiError(503, event.error, code="server_stopped")
    return ApiError(500, f"generation failed: {event.error}", code="generation_failed")


def _timeout(state) -> ApiError:
    return ApiError(
        504,
        f"the request did not finish within {state.limits.request_timeout_s:g} s (set with --request-timeout); "
        "ask for fewer tokens or retry when the server is less busy",
        code="timeout",
    )


async def _collect(state, job: Job, reqs, mailbox: Mailbox, request, deadline: float) -> dict | None:
    """Wait for every choice; None if the client went away (its requests are cancelled)."""
    texts, reasons = [""] * len(reqs), [None] * len(reqs)
    prompt = completion = 0
    checked = time.monotonic()
    try:
        while any(r is None for r in reasons):
            items = await mailbox.get_all(min(_POLL_S, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                raise _timeout(state)
            if time.monotonic() - checked >= _POLL_S:  # tokens may arrive faster than the poll interval
                checked = time.monotonic()
                if await request.is_disconnected():
                    return None
            for index, event in items:
                if event.error:
                    raise _event_error(event)
                texts[index] += event.text
                if event.finish_reason:
                    reasons[index] = event.finish_reason
                    prompt, completion = prompt + event.prompt_tokens, completion + event.completion_tokens
    finally:
        _cancel_unfinished(state, reqs)
    return protocol.response(job, protocol.new_id(job.chat), texts, reasons, protocol.usage(prompt, completion))


async def _sse(state, job: Job, reqs, mailbox: Mailbox, deadline: float) -> AsyncIterator[str]:
    """Server-sent events, what arrived together in one write; leaving early (client gone) cancels the rest."""
    rid, done, prompt, completion = protocol.new_id(job.chat), 0, 0, 0
    try:
        if job.chat:
            yield "".join(_data(protocol.chunk(job, rid, i, None, None, role=True)) for i in range(len(reqs)))
        while done < len(reqs):
            items, out, failed = await mailbox.get_all(deadline - time.monotonic()), [], False
            if not items:
                yield _data(_timeout(state).body())
                break
            for index, event in items:
                if event.error:
                    out.append(_data(_event_error(event).body()))
                    failed = True
                    break
                if event.text or event.finish_reason:
                    out.append(_data(protocol.chunk(job, rid, index, event.text, event.finish_reason)))
                if event.finish_reason:
                    done += 1
                    prompt, completion = prompt + event.prompt_tokens, completion + event.completion_tokens
            yield "".join(out)
            if failed:
                break
        if job.include_usage:
            yield _data(protocol.usage_chunk(job, rid, prompt, completion))
        yield "data: [DONE]\n\n"
    finally:
        _cancel_unfinished(state, reqs)


def _cancel_unfinished(state, reqs) -> None:
    for req in reqs:
        if not req.finished:
            state.batcher.cancel(req)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
