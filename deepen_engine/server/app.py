"""The OpenAI-compatible HTTP app (Starlette): one ensemble behind `/v1/chat/completions`,
`/v1/completions`, `/v1/models` and `/health`.

One request's way: API key check -> JSON body read (`protocol.py`) -> the ensemble view
with the request's fusion settings -> `Ensemble.astream` (the scheduler batches it with
every other request in flight) -> the answer in OpenAI's format (`responses.py`), whole or
as server-sent events (`data: {chunk}` lines, then `data: [DONE]`).

Errors come as OpenAI error bodies: 400 for a bad parameter (named in `param`) or a prompt
too long for a member, 401 for a wrong API key, 404 for an unknown path, 408 for a request
past its timeout, 429 when the queue is full, 500 when a member fails, 503 while the
ensemble loads. A client that disconnects, streaming or not, frees its rows at the next
decoding step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import GenerationConfig
from ..ensemble import Ensemble
from ..errors import ConfigError, MemberError, QueueFullError, RequestTimeoutError
from ..outputs import GenerationResult, StreamEvent, collect
from .protocol import BadRequest, Call, parse_chat, parse_completion
from .responses import Answer, error_body

_ENGINE_TO_API = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "top_k": "top_k",
    "json_schema": "response_format",
}


class ServerState:
    """The ensemble (once loaded) and the server's settings."""

    def __init__(
        self,
        ensemble: Ensemble | None,
        model_name: str | None,
        api_key: str | None,
        request_timeout: float | None,
        main: int | str | None,
    ) -> None:
        self.ensemble = ensemble
        self.load_error: str | None = None
        self.model_name = model_name
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.main = main  # None: chat requests use the engine's chat rule

    def name(self) -> str:
        """The model name the server reports."""
        if self.model_name:
            return self.model_name
        members = [m.name for m in self.ensemble.members] if self.ensemble else []
        return "deepen:" + "+".join(members)

    def view(self, call: Call) -> Ensemble:
        """The ensemble with the request's fusion settings (`Ensemble.view`: the request's,
        then the server's `--main`, then the ensemble's; chat led by the chat rule).
        """
        ens = self.ensemble
        assert ens is not None
        return ens.view(call.fusion, defaults={"main": self.main}, chat=call.chat)


def create_app(
    ensemble: Ensemble | None = None,
    *,
    load: Callable[[], Ensemble] | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    request_timeout: float | None = None,
    main: int | str | None = None,
) -> Starlette:
    """The ASGI app serving `ensemble`, or the one `load()` returns (loaded in a thread at
    startup; requests get 503 until it is ready).

    Args:
        ensemble: a loaded ensemble to serve.
        load: or a function that loads one (the server answers 503 until it returns).
        model_name: the name reported in responses and `/v1/models` (default
            `deepen:<member>+<member>`); requests may name any model.
        api_key: when set, requests need `Authorization: Bearer <api_key>`.
        request_timeout: seconds each request may take (`GenerationConfig.timeout`);
            a request's own `timeout` field overrides it.
        main: the main member for every request (default: the engine's chat rule for chat
            requests, the ensemble's main member for completions).
    """
    if (ensemble is None) == (load is None):
        raise ConfigError("create_app needs an ensemble or a load function, not both.")
    state = ServerState(ensemble, model_name, api_key, request_timeout, main)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if load is not None:
            threading.Thread(target=_load, args=(state, load), daemon=True).start()
        yield

    routes = [
        Route("/health", _endpoint(state, _health, auth=False), methods=["GET"]),
        Route("/v1/models", _endpoint(state, _models), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(state, _chat), methods=["POST"]),
        Route("/v1/completions", _endpoint(state, _completions), methods=["POST"]),
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


Handler = Callable[[ServerState, Request], Any]


def _endpoint(state: ServerState, handler: Handler, auth: bool = True) -> Any:
    async def endpoint(request: Request) -> Response:
        try:
            if auth:
                _check_key(state, request)
            result: Response = await handler(state, request)
            return result
        except Exception as exc:
            return error_response(exc)

    return endpoint


def _check_key(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
        raise _Unauthorized()


class _Unauthorized(Exception):
    pass


class _Loading(Exception):
    def __init__(self, state: ServerState) -> None:
        failed = state.load_error
        super().__init__(
            f"the ensemble failed to load: {failed}"
            if failed
            else "the ensemble is still loading; retry in a few seconds."
        )


async def _health(state: ServerState, request: Request) -> Response:
    if state.ensemble is None:
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "message": str(_Loading(state))}, status_code=503)
    return JSONResponse({"status": "ok", "model": state.name(), **state.ensemble.queue_state()})


async def _models(state: ServerState, request: Request) -> Response:
    _ready(state)
    model = {"id": state.name(), "object": "model", "created": 0, "owned_by": "deepen"}
    return JSONResponse({"object": "list", "data": [model]})


def _ready(state: ServerState) -> Ensemble:
    if state.ensemble is None:
        raise _Loading(state)
    return state.ensemble


async def _chat(state: ServerState, request: Request) -> Response:
    return await _generate(state, request, parse_chat(await _body(request)))


async def _completions(state: ServerState, request: Request) -> Response:
    return await _generate(state, request, parse_completion(await _body(request)))


async def _body(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(None, "The request body is not valid JSON.") from None


async def _generate(state: ServerState, request: Request, call: Call) -> Response:
    _ready(state)
    view = state.view(call)
    generation = dict(call.generation)
    if state.request_timeout is not None:
        generation.setdefault("timeout", state.request_timeout)
    config = GenerationConfig(**generation, logprobs=call.logprobs)
    answer = Answer(state.name(), call.chat)
    prompt = call.prompts[0] if call.chat else call.prompts
    tools = {"tools": call.tools, "tool_choice": call.tool_choice} if call.tools else {}
    events = view.astream(prompt, config, **tools)
    if call.stream:
        return await _stream(events, call, answer, view.main.name)
    results = await _collect(request, events, len(call.prompts))
    return JSONResponse(answer.full(results, view.main.name, call.logprobs is not None))


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
                raise _ClientGone()
    finally:
        if not task.done():
            task.cancel()


class _ClientGone(Exception):
    pass


async def _stream(
    events: AsyncGenerator[StreamEvent, None], call: Call, answer: Answer, main: str
) -> Response:
    """Server-sent events; the first event is awaited first, so a request the engine
    refuses (say a prompt too long) still gets its 4xx status.
    """
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = None

    async def body() -> AsyncIterator[str]:
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
                yield _sse(answer.usage_chunk(usages, main))
        except Exception as exc:  # after the headers: the error goes in the stream
            yield _sse(_error_payload(exc)[1])
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _chain(
    first: list[StreamEvent], rest: AsyncGenerator[StreamEvent, None]
) -> AsyncIterator[StreamEvent]:
    for event in first:
        yield event
    async for event in rest:
        yield event


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_response(exc: Exception) -> JSONResponse:
    """The OpenAI error response for an exception."""
    status, body = _error_payload(exc)
    return JSONResponse(body, status_code=status)


def _error_payload(exc: Exception) -> tuple[int, dict[str, Any]]:
    if isinstance(exc, BadRequest):
        return 400, error_body(exc.message, "invalid_request_error", exc.param)
    if isinstance(exc, ConfigError):
        return 400, error_body(str(exc), "invalid_request_error", _param_of(str(exc)))
    if isinstance(exc, _Unauthorized):
        message = "Incorrect API key provided; send it as 'Authorization: Bearer <key>'."
        return 401, error_body(message, "authentication_error", None, "invalid_api_key")
    if isinstance(exc, RequestTimeoutError):
        return 408, error_body(str(exc), "timeout_error", None, "timeout")
    if isinstance(exc, QueueFullError):
        return 429, error_body(str(exc), "rate_limit_error", None, "queue_full")
    if isinstance(exc, _Loading):
        return 503, error_body(str(exc), "service_unavailable", None, "loading")
    if isinstance(exc, _ClientGone):
        return 499, error_body("the client closed the request.", "client_closed_request")
    if isinstance(exc, MemberError):
        return 500, error_body(str(exc), "server_error", None, "member_error")
    return 500, error_body(f"{type(exc).__name__}: {exc}", "server_error")


def _param_of(message: str) -> str | None:
    """The API parameter an engine settings error names, if any."""
    match = re.search(r"(?:GenerationConfig|FusionConfig)\.(\w+)", message)
    if match:
        field = match.group(1)
        return _ENGINE_TO_API.get(field, field)
    if message.startswith("Prompt "):
        return "messages"
    match = re.match(r"(tools|tool_choice|messages)\b", message)  # the engine's tool checks
    return match.group(1) if match else None


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, kind), status_code=exc.status_code)
