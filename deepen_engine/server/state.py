"""What one server holds: the ensemble (once loaded), its settings, its metrics, the
requests in flight, and whether it is draining for a shutdown.

Defaults are decided in one function each: fusion settings by `Ensemble.view` (request ->
`--main` -> engine), generation settings by `ServerState.generation_config` (request ->
`--request-timeout` -> `GenerationConfig`'s defaults), as vLLM's `to_sampling_params`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..config import GenerationConfig
from ..ensemble import Ensemble
from .errors import Unavailable
from .metrics import Metrics
from .protocol import Call


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
        self.metrics = Metrics(lambda: self.ensemble)
        self.in_flight = 0  # generation requests not yet answered in full
        self._lock = threading.Lock()
        self.drain_deadline: float | None = None  # monotonic; set once draining starts

    def name(self) -> str:
        """The model name the server reports."""
        if self.model_name:
            return self.model_name
        members = [m.name for m in self.ensemble.members] if self.ensemble else []
        return "deepen:" + "+".join(members)

    def ready(self) -> Ensemble:
        """The ensemble, or `Unavailable` (503) while it loads, if it failed, or while the
        server drains.
        """
        if self.draining:
            raise Unavailable(
                "the server is shutting down and takes no new requests; retry on another "
                "replica or after it restarts.",
                "shutting_down",
            )
        if self.ensemble is None:
            if self.load_error:
                raise Unavailable(f"the ensemble failed to load: {self.load_error}", "load_failed")
            raise Unavailable("the ensemble is still loading; retry in a few seconds.", "loading")
        return self.ensemble

    def view(self, call: Call) -> Ensemble:
        """The ensemble with the request's fusion settings (`Ensemble.view`: the request's,
        then the server's `--main`, then the ensemble's; chat led by the chat rule).
        """
        ens = self.ensemble
        assert ens is not None
        return ens.view(call.fusion, defaults={"main": self.main}, chat=call.chat)

    def generation_config(self, call: Call) -> GenerationConfig:
        """The request's generation settings: its own fields, then the server's
        `request_timeout`, then `GenerationConfig`'s defaults.
        """
        server: dict[str, Any] = {"timeout": self.request_timeout}
        wanted = {k: v for k, v in server.items() if v is not None}
        wanted.update(call.generation)
        return GenerationConfig(**wanted, logprobs=call.logprobs)

    # --- requests in flight and draining -------------------------------------------------

    def enter(self) -> None:
        """A generation request starts (refused with 503 while draining)."""
        with self._lock:
            self.ready()
            self.in_flight += 1

    def leave(self) -> None:
        """A generation request has been answered (or abandoned)."""
        with self._lock:
            self.in_flight -= 1

    @property
    def draining(self) -> bool:
        """Whether a shutdown began: new requests get 503, those in flight finish."""
        return self.drain_deadline is not None

    def begin_drain(self, timeout: float) -> None:
        """Stop taking requests; those in flight get `timeout` seconds to finish."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + timeout

    def drained(self) -> bool:
        """Whether a drain is over: nothing in flight, or its time is up."""
        if self.drain_deadline is None:
            return False
        return self.in_flight == 0 or time.monotonic() >= self.drain_deadline
