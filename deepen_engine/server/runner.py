"""Running the app under uvicorn with a graceful shutdown (TGI's drain).

On SIGTERM or SIGINT, `DrainingServer`:
1. marks the app draining: new requests get 503 with `Retry-After` (the socket stays
   open, so a client sees a clear answer, not a refused connection);
2. waits until the requests in flight are answered, or `shutdown_timeout` seconds pass;
3. lets uvicorn stop: it closes the socket and connections, then the app's lifespan
   shutdown frees the members (their Ray actors included);
4. returns normally, so the process exits 0. A second signal during the drain stops at
   once (uvicorn's own handling, which re-raises the signal).
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from ..errors import ConfigError
from ..heap import MALLOC_TRIM_INTERVAL
from .memory import MallocTrimmer
from .state import ServerState

log = logging.getLogger("deepen.server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM / SIGINT drains the app before stopping."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float) -> None:
        if shutdown_timeout < 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}.")
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        app = config.app
        state = getattr(getattr(app, "state", None), "deepen", None)
        if not isinstance(state, ServerState):
            raise ConfigError("DrainingServer serves an app made by deepen's create_app.")
        self.deepen = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first signal starts the drain; another one stops at once."""
        if self.deepen.draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        log.info(
            "deepen serve: %s: draining %d request(s) in flight (up to %gs); new requests get 503",
            signal.Signals(sig).name, self.deepen.in_flight, self.shutdown_timeout,
        )  # fmt: skip
        self.deepen.begin_drain(self.shutdown_timeout)

    async def on_tick(self, counter: int) -> bool:
        """The tick of uvicorn (every 0.1 s): stop once a drain is over."""
        if self.deepen.drained():
            if self.deepen.in_flight:
                log.warning(
                    "deepen serve: shutdown timeout: %d request(s) still in flight are cut",
                    self.deepen.in_flight,
                )
            else:
                log.info("deepen serve: drained; stopping")
            return True
        return await super().on_tick(counter)


def serve(
    app: Starlette,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    malloc_trim_interval: float = MALLOC_TRIM_INTERVAL,
    **options: Any,
) -> None:
    """Serve `app` (from `create_app`) until SIGTERM / SIGINT and a drain; blocks. Every
    `malloc_trim_interval` seconds (0: never) the free memory malloc holds is given back to
    the system (memory.py: without it the RSS of a loaded server grows with time).
    """
    config = uvicorn.Config(app, host=host, port=port, **options)
    # what the drain could not finish is cut at once, not waited for again
    config.timeout_graceful_shutdown = 1
    server = DrainingServer(config, shutdown_timeout)
    trimmer = MallocTrimmer(malloc_trim_interval)
    trimmer.start()
    try:
        server.run()
    finally:
        trimmer.stop()
