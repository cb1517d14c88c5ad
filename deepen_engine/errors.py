"""The package's error types: one base class, and `ValueError` subclasses for bad input."""

from __future__ import annotations


class DeepenError(Exception):
    """Base class of every error deepen raises on purpose."""


class ConfigError(DeepenError, ValueError):
    """A setting or argument has a bad value; the message names it and the fix."""


class MemberLoadError(DeepenError, ValueError):
    """A member could not be loaded; the message names the member and the cause."""


class AlignmentError(DeepenError, ValueError):
    """Members cannot be aligned (for example they share too few anchor tokens)."""
