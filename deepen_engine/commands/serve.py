"""`deepen serve`: an OpenAI-compatible HTTP server for an ensemble (the `server` extra).

    deepen serve                                   # the default members on 127.0.0.1:8000
    deepen serve --port 9000 --api-key secret --max-batch-size 16
    deepen serve -m Org/A -m Org/B --shutdown-timeout 60

The members load in the background; `/health` answers 503 until they are ready. Every
client of the server shares the members' forward passes (continuous batching).
`/metrics` is Prometheus text; each request is logged in one line with its id (also the
`x-request-id` header). SIGTERM / SIGINT drains: new requests get 503, those in flight
finish (up to `--shutdown-timeout`), the members are freed, and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..config import FusionConfig
from ..ensemble import Ensemble
from ..errors import ConfigError
from ..heap import MALLOC_TRIM_INTERVAL
from .options import fusion_options, fusion_settings, member_options, member_specs
from .scheduler_options import add_scheduler_limits, scheduler_limits

SERVER_LIMITS = ("max_batch_size", "max_queue", "speculate_max_rows", "draft_precision")
"""The `SchedulerConfig` limits `deepen serve` takes as flags."""


def add_parser(sub: Any) -> None:
    """Register `deepen serve`."""
    parser = sub.add_parser(
        "serve",
        parents=[member_options(), fusion_options()],
        help="serve the ensemble over an OpenAI-compatible HTTP API",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DEEPEN_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $DEEPEN_API_KEY, else no key)",
    )
    parser.add_argument(
        "--served-model-name",
        help="model name in responses and /v1/models (default: deepen:<member>+<member>)",
    )
    add_scheduler_limits(parser, SERVER_LIMITS)
    parser.add_argument(
        "--request-timeout",
        type=float,
        help="seconds a request may take, waiting included; 408 past it (default: none)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds to let requests in flight finish while new ones get "
        "503 (default: 30)",
    )
    rows = FusionConfig.model_fields["row_cache_size"].default
    parser.add_argument(
        "--row-cache-size",
        type=int,
        default=rows,
        help="DeePEn relative rows cached per member, allocated in full at start so they do "
        f"not grow the memory later (about 0.2 MB each with the default members; default: {rows})",
    )
    parser.add_argument(
        "--malloc-trim-interval",
        type=float,
        default=MALLOC_TRIM_INTERVAL,
        help="seconds between two calls of glibc's malloc_trim, which gives the memory freed "
        "under load back to the system (0: never; default: %(default)g)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Start the server (blocks until interrupted)."""
    try:
        from ..server import create_app
        from ..server.runner import serve
    except ImportError as exc:
        raise ConfigError(
            f"deepen serve needs the server extra ({exc.name} is missing): "
            "pip install 'deepen[server]'"
        ) from None
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be from 1 to 65535, got {args.port}.")
    if args.row_cache_size < 0:
        raise ConfigError(f"--row-cache-size must be >= 0 rows, got {args.row_cache_size}.")
    if args.malloc_trim_interval < 0:
        raise ConfigError(
            f"--malloc-trim-interval must be >= 0 seconds, got {args.malloc_trim_interval}."
        )
    if args.shutdown_timeout < 0:
        raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}.")
    scheduler = scheduler_limits(args, SERVER_LIMITS)
    specs = member_specs(args)
    fusion = fusion_settings(args)
    main = fusion.pop("main", None)

    def load() -> Ensemble:
        ens = Ensemble(specs, scheduler=scheduler, row_cache_size=args.row_cache_size, **fusion)
        # held from the start, so the server's memory does not creep up as the caches fill
        reserved = ens.reserve_row_caches() / 2**20
        names = ", ".join(m.name for m in ens.members)
        print(f"deepen serve: members ready: {names} ({reserved:.0f} MiB of relative-row "
              "caches reserved; --row-cache-size sets it)", file=sys.stderr)  # fmt: skip
        return ens

    app = create_app(
        load=load,
        model_name=args.served_model_name,
        api_key=args.api_key,
        request_timeout=args.request_timeout,
        main=main,
        close_at_shutdown=True,
    )
    print(f"deepen serve: http://{args.host}:{args.port}/v1 (members loading)", file=sys.stderr)
    # one line per request (server/metrics.py), at --log-level like uvicorn's own
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    server_log = logging.getLogger("deepen.server")
    server_log.addHandler(handler)
    server_log.setLevel(args.log_level.upper())
    serve(
        app,
        args.host,
        args.port,
        shutdown_timeout=args.shutdown_timeout,
        malloc_trim_interval=args.malloc_trim_interval,
        log_level=args.log_level,
    )
    return 0
