"""Exceptions as OpenAI error bodies: the HTTP status, the error type, and the API parameter
at fault, read from `ConfigError.field` (never parsed back from a message).

400 a bad parameter (named in `param`) or a prompt too long for a member, 401 a wrong API
key, 408 a request past its timeout, 429 a full queue, 499 a client that left, 500 a member
that failed, 503 while the ensemble loads or the server drains (with `Retry-After`).
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from ..config import REQUEST_FUSION_NAMES
from ..errors import ConfigError, MemberError, QueueFullError, RequestTimeoutError
from .protocol import BadRequest
from .responses import error_body

# GenerationConfig field -> request body field, where the names differ
_GENERATION_TO_API = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "json_schema": "response_format",
}
# FusionConfig field -> request body field (`top_k` is public as `fusion_top_k`)
_FUSION_TO_API = {field: name for name, field in REQUEST_FUSION_NAMES.items()}
_SETTINGS = ("GenerationConfig", "FusionConfig")
RETRY_AFTER = "5"  # seconds a 503 asks the client to wait


class Unauthorized(Exception):
    """A request without the server's API key."""


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


class Unavailable(Exception):
    """The server cannot take requests now: loading, failed to load, or draining."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def api_param(exc: ConfigError, chat: bool) -> str | None:
    """The request body field an engine `ConfigError` is about, or None."""
    field = exc.field
    if field is None:
        return None
    if exc.owner == "FusionConfig":
        return _FUSION_TO_API.get(field, field)
    if field == "prompt" and chat:
        return "messages"
    return _GENERATION_TO_API.get(field, field)


def error_payload(exc: Exception, chat: bool = True) -> tuple[int, dict[str, Any]]:
    """`(status, OpenAI error body)` of an exception."""
    if isinstance(exc, BadRequest):
        return 400, error_body(exc.message, "invalid_request_error", exc.param)
    if isinstance(exc, ConfigError):
        param = api_param(exc, chat)
        # a settings class's error is reworded with the API's name for its field
        message = f"{param}: {exc.reason}" if param and exc.owner in _SETTINGS else str(exc)
        return 400, error_body(message, "invalid_request_error", param)
    if isinstance(exc, Unauthorized):
        message = "Incorrect API key provided; send it as 'Authorization: Bearer <key>'."
        return 401, error_body(message, "authentication_error", None, "invalid_api_key")
    if isinstance(exc, RequestTimeoutError):
        return 408, error_body(str(exc), "timeout_error", None, "timeout")
    if isinstance(exc, QueueFullError):
        return 429, error_body(str(exc), "rate_limit_error", None, "queue_full")
    if isinstance(exc, Unavailable):
        return 503, error_body(str(exc), "service_unavailable", None, exc.code)
    if isinstance(exc, ClientGone):
        return 499, error_body("the client closed the request.", "client_closed_request")
    if isinstance(exc, MemberError):
        return 500, error_body(str(exc), "server_error", None, "member_error")
    return 500, error_body(f"{type(exc).__name__}: {exc}", "server_error")


def error_response(exc: Exception, chat: bool = True) -> JSONResponse:
    """The OpenAI error response for an exception (503s carry `Retry-After`)."""
    status, body = error_payload(exc, chat)
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def failure_reason(exc: Exception) -> str:
    """The `deepen_request_failure_total` label of an exception."""
    if isinstance(exc, RequestTimeoutError):
        return "timeout"
    if isinstance(exc, ClientGone):
        return "aborted"
    if isinstance(exc, (BadRequest, ConfigError)):
        return "invalid"
    if isinstance(exc, QueueFullError):
        return "queue_full"
    if isinstance(exc, (Unauthorized, Unavailable)):
        return "refused"
    return "error"
