"""The package's error types: one base class, `ValueError` subclasses for bad input, and
a `RuntimeError` subclass for a member that failed while generating.

docs/errors.md lists every error a user can get, what it means and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class DeepenError(Exception):
    """Base class of every error deepen raises on purpose."""


class ConfigError(DeepenError, ValueError):
    """A setting or argument has a bad value; the message names it and the fix.

    `field` and `owner` say which setting, as data (`field="eta", owner="FusionConfig"`),
    so the server, the command line and the adapters name it in their own words (an API
    parameter, a flag, an adapter field) without reading the message.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        owner: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        """The setting at fault (the first one, when several are), or None if unknown."""
        self.owner = owner
        """The settings class `field` belongs to (`"FusionConfig"`), or None."""
        self.reason = reason if reason is not None else message
        """What is wrong, without the `Owner.field: ` prefix (for rewording the name)."""


class InvalidField(ValueError):
    """A validator's `ValueError` about a check across fields, naming the field to blame
    (pydantic gives such checks no location), so `ConfigError.field` is still set.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class MemberLoadError(DeepenError, ValueError):
    """A member could not be loaded; the message names the member and the cause."""


class AlignmentError(DeepenError, ValueError):
    """Members cannot be aligned (for example they share too few anchor tokens)."""


class MemberError(DeepenError, RuntimeError):
    """A member failed while generating (its forward pass raised).

    The message names the member; the member's own exception is the `__cause__`. The
    request that hit it is abandoned (all its rows: they share the member's batch), its
    caches are freed, and the ensemble serves the next request.
    """

    def __init__(self, member: str, message: str) -> None:
        super().__init__(message)
        self.member = member
        """Name of the member that failed."""


class QueueFullError(DeepenError, RuntimeError):
    """The ensemble's request queue is full (`SchedulerConfig.max_queue`); retry later.

    Raised at once when the request is made, never after a wait.
    """


class RequestTimeoutError(DeepenError, TimeoutError):
    """A request ran past its `GenerationConfig.timeout`; its rows were dropped."""


class OutputCutError(DeepenError, ValueError):
    """A constrained reply (structured output, a tool call) reached its token limit before
    its JSON closed (`finish_reason` "length"): raise `max_tokens`. The adapters raise it
    instead of returning part of an object.
    """


def validation_error(owner: str, exc: ValidationError) -> ConfigError:
    """A pydantic `ValidationError` as a `ConfigError` worded by `explain_validation`, with
    `field`, `owner` and `reason` of its first problem: the one place a settings class's
    errors get their structured field.
    """
    err = exc.errors()[0]
    error = err.get("ctx", {}).get("error")
    field = str(err["loc"][0]) if err["loc"] else getattr(error, "field", None)
    if isinstance(error, ConfigError):
        field, reason = error.field or field, error.reason
    elif err["type"] == "extra_forbidden":
        reason = "no such setting; check the spelling."
    else:
        msg = err["msg"].removeprefix("Value error, ")
        reason = f"{msg}." if not err["loc"] else f"{msg}, got {err.get('input')!r}."
    return ConfigError(explain_validation(owner, exc), field=field, owner=owner, reason=reason)


def explain_validation(owner: str, exc: ValidationError) -> str:
    """A pydantic `ValidationError` as one line per problem, each naming `owner`'s field:
    `FusionConfig.eta: Input should be greater than or equal to 0, got -1.`

    A check of ours that raised `ConfigError` is already worded (it names its field and the
    fix) and is kept as it is. Used by the engine's settings and the adapters' alike.
    """
    lines = []
    for err in exc.errors():
        error = err.get("ctx", {}).get("error")
        if isinstance(error, ConfigError):
            lines.append(str(error))
            continue
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{owner} has no setting {field!r}; check the spelling.")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across fields names its fields itself
            lines.append(f"{owner}: {msg}.")
            continue
        lines.append(f"{owner}.{field}: {msg}, got {err.get('input')!r}.")
    return " ".join(lines)
