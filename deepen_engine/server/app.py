"""The OpenAI-compatible HTTP app (Starlette): one ensemble behind `/v1/chat/completions`,
`/v1/completions`, `/v1/models`, `/health`, `/metrics` (Prometheus) and `/openapi.json`
with a `/docs` page.

One request's way: API key check -> JSON body read and checked (`protocol.py`: an unknown
field is a 400 naming it) -> the ensemble view with the request's fusion settings and the
generation settings (`state.py`: one function each decides the defaults) ->
`Ensemble.astream` (the scheduler batches it with every other request in flight) -> the
answer in OpenAI's format (`responses.py`), whole or as server-sent events (`data: {chunk}`
lines, then `data: [DONE]`). Each generation request gets an id (the client's
`x-request-id`, else a new one), returned as the `x-request-id` header and logged in one
line with its counts (`metrics.py`).

Errors come as OpenAI error bodies (`errors.py`). A client that disconnects, streaming or
not, frees its rows at the next decoding step. While the server drains for a shutdown
(`ServerState.begin_drain`, wired to SIGTERM by `deepen serve`), new requests get 503 with
`Retry-After` and those in flight finish.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..ensemble import Ensemble
from ..errors import ConfigError
from ..outputs import GenerationResult, StreamEvent, collect
from .errors import (
    RETRY_AFTER,
    ClientGone,
    Unauthorized,
    error_payload,
    error_response,
    failure_reason,
)
from .metrics import CONTENT_TYPE, RequestMeter
from .openapi import docs_page, openapi_document
from .protocol import BadRequest, Call, parse_chat, parse_completion
from .responses import Answer, error_body
from .state import ServerState

log = logging.getLogger("deepen.server")


def create_app(
    ensemble: Ensemble | None = None,
    *,
    load: Callable[[], Ensemble] | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    request_timeout: float | None = None,
    main: int | str | None = None,
    close_at_shutdown: bool = False,
) -> Starlette:
    """The ASGI app serving `ensemble`, or the one `load()` returns (loaded in a thread at
    startup; requests get 503 until it is ready).

    Args:
        ensemble: a loaded ensemble to serve (the caller closes it).
        load: or a function that loads one (the server answers 503 until it returns).
        model_name: the name reported in responses and `/v1/models` (default
            `deepen:<member>+<member>`); requests may name any model.
        api_key: when set, requests need `Authorization: Bearer <api_key>`.
        request_timeout: seconds each request may take (`GenerationConfig.timeout`);
            a request's own `timeout` field overrides it.
        main: the main member for every request (default: the engine's chat rule for chat
            requests, the ensemble's main member for completions).
        close_at_shutdown: close the ensemble (its members' caches and Ray actors) when the
            app shuts down (`deepen serve` does; an ensemble shared with other code is
            left open by default).
    """
    if (ensemble is None) == (load is None):
        raise ConfigError("create_app needs an ensemble or a load function, not both.")
    state = ServerState(ensemble, model_name, api_key, request_timeout, main)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if load is not None:
            threading.Thread(target=_load, args=(state, load), daemon=True).start()
        yield
        if close_at_shutdown and state.ensemble is not None:
            state.ensemble.close()  # frees the members' caches and their Ray actors
            log.info("deepen serve: members freed")

    routes = [
        Route("/health", _endpoint(state, _health, auth=False), methods=["GET"]),
        Route("/metrics", _endpoint(state, _metrics, auth=False), methods=["GET"]),
        Route("/openapi.json", _endpoint(state, _openapi, auth=False), methods=["GET"]),
        Route("/docs", _endpoint(state, _docs, auth=False), methods=["GET"]),
        Route("/v1/models", _endpoint(state, _models), methods=["GET"]),
        Route("/v1/chat/completions", _generation(state, parse_chat), methods=["POST"]),
        Route("/v1/completions", _generation(state, parse_completion), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.state.deepen = state
    return app


def _load(state: ServerState, load: Callable[[], Ensemble]) -> None:
    try:
        state.ensemble = load()
    except Exception as exc:  # reported by /health and every request
        state.load_error = f"{type(exc).__name__}: {exc}"


Handler = Callable[[ServerState, Request], Awaitable[Response]]


def _endpoint(state: ServerState, handler: Handler, auth: bool = True) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            if auth:
                _check_key(state, request)
            return await handler(state, request)
        except Exception as exc:
            return error_response(exc)

    return endpoint


def _generation(state: ServerState, parse: Callable[[Any], Call]) -> Any:
    """A generation endpoint: the request id, the metering, the count of requests in
    flight (a drain waits for it), and the error answer.
    """
    chat = parse is parse_chat

    async def endpoint(request: Request) -> Response:
        given = request.headers.get("x-request-id")
        meter = RequestMeter(state.metrics, request.url.path, given[:128] if given else None)
        entered = False
        try:
            _check_key(state, request)
            state.enter()
            entered = True
            call = parse(await _body(request))
            response = await _generate(state, request, call, meter)
        except Exception as exc:
            response = error_response(exc, chat)
            meter.finish(response.status_code, failure_reason(exc))
            if entered:
                state.leave()
        response.headers["x-request-id"] = meter.id
        return response

    return endpoint


def _check_key(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
        raise Unauthorized()


async def _health(state: ServerState, request: Request) -> Response:
    try:
        ensemble = state.ready()
    except Exception as exc:
        status = "error" if state.load_error else "draining" if state.draining else "loading"
        body = {"status": status, "message": str(exc)}
        return JSONResponse(body, status_code=503, headers={"Retry-After": RETRY_AFTER})
    return JSONResponse({"status": "ok", "model": state.name(), **ensemble.queue_state()})


async def _metrics(state: ServerState, request: Request) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def _openapi(state: ServerState, request: Request) -> Response:
    return JSONResponse(openapi_document())


async def _docs(state: ServerState, request: Request) -> Response:
    return HTMLResponse(docs_page())


async def _models(state: ServerState, request: Request) -> Response:
    state.ready()
    model = {"id": state.name(), "object": "model", "created": 0, "owned_by": "deepen"}
    return JSONResponse({"object": "list", "data": [model]})


async def _body(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(None, "The request body is not valid JSON.") from None


async def _generate(
    state: ServerState, request: Request, call: Call, meter: RequestMeter
) -> Response:
    view = state.view(call)
    config = state.generation_config(call)
    answer = Answer(state.name(), call.chat)
    meter.main = view.main.name
    prompt = call.prompts[0] if call.chat else call.prompts
    tools = {"tools": call.tools, "tool_choice": call.tool_choice} if call.tools else {}
    events = _metered(view.astream(prompt, config, **tools), meter)
    if call.stream:
        return await _stream(state, events, call, answer, meter)
    results = await _collect(request, events, len(call.prompts))
    meter.finish(200)
    state.leave()
    return JSONResponse(answer.full(results, view.main.name, call.logprobs is not None))


async def _metered(
    events: AsyncGenerator[StreamEvent, None], meter: RequestMeter
) -> AsyncGenerator[StreamEvent, None]:
    """The events, each noted by the request's meter."""
    try:
        async for event in events:
            meter.event(event)
            yield event
    finally:
        await events.aclose()


async def _collect(
    request: Request, events: AsyncGenerator[StreamEvent, None], n_rows: int
) -> list[GenerationResult]:
    """All events of a non-streamed request; a client that leaves cancels it."""

    async def gather() -> list[StreamEvent]:
        return [event async for event in events]

    task = asyncio.ensure_future(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return collect(task.result(), n_rows)
            if await request.is_disconnected():
                task.cancel()  # the reader's cancellation frees the rows
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


async def _stream(
    state: ServerState,
    events: AsyncGenerator[StreamEvent, None],
    call: Call,
    answer: Answer,
    meter: RequestMeter,
) -> Response:
    """Server-sent events; the first event is awaited first, so a request the engine
    refuses (say a prompt too long) still gets its 4xx status.
    """
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None
    outcome: list[str | None] = []  # set once the body ran to its end: None or a failure

    async def body() -> AsyncGenerator[str, None]:
        usages = []
        try:
            if call.chat:
                yield _sse(answer.chunk(0, "", role=True))
            pending = [first] if first is not None else []
            async for event in _chain(pending, events):
                if event.delta or event.logprobs:
                    yield _sse(answer.chunk(event.index, event.delta, logprobs=event.logprobs))
                if event.tool_calls:
                    yield _sse(answer.tool_calls_chunk(event.index, event.tool_calls))
                if event.finish_reason is not None:
                    yield _sse(answer.chunk(event.index, None, event.finish_reason))
                    if event.usage is not None:
                        usages.append(event.usage)
            if call.include_usage:
                yield _sse(answer.usage_chunk(usages, meter.main))
            outcome.append(None)
        except Exception as exc:  # after the headers: the error goes in the stream
            outcome.append(failure_reason(exc))
            yield _sse(error_payload(exc, call.chat)[1])
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    stream = body()

    async def end() -> None:
        await stream.aclose()  # a client gone mid-stream: frees the rows now
        meter.finish(200, outcome[0] if outcome else "aborted")
        state.leave()

    return _EndingStream(stream, end)


class _EndingStream(StreamingResponse):
    """A stream that runs `end` once it is over, sent in full or cut by the client."""

    def __init__(self, body: AsyncIterator[str], end: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._end()


async def _chain(
    first: list[StreamEvent], rest: AsyncGenerator[StreamEvent, None]
) -> AsyncIterator[StreamEvent]:
    for event in first:
        yield event
    async for event in rest:
        yield event


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, kind), status_code=exc.status_code)
