"""The base of every settings class (config.py): unknown fields and bad values raise
`ConfigError` naming the class, the field and the valid range, on construction and on
assignment alike.
"""

from __future__ import annotations

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from .errors import validation_error


def index_or(*words: str) -> BeforeValidator:
    """A field validator that lets a member index (an int >= 0, not a bool) or one of
    `words` through and rejects anything else.
    """

    def check(value: object) -> object:  # a member index >= 0 (not a bool) or one of `words`
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0 or value in words:
            return value
        raise ValueError("Input should be a member index >= 0 or " + " or ".join(map(repr, words)))

    return BeforeValidator(check)


class Settings(BaseModel):
    """Settings with every field validated: unknown fields are refused, and a bad value
    raises `ConfigError` on construction and on assignment.
    """

    # use_attribute_docstrings: each field's docstring is its description (the CLI's help).
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, use_attribute_docstrings=True
    )

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise validation_error(type(self).__name__, exc) from None

    def __setattr__(self, name: str, value: object) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise validation_error(type(self).__name__, exc) from None
