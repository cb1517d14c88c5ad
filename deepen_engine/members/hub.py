"""Hub ids without waiting on the network: whether a model is in the local Hugging Face
cache and whether the hub can be reached, both found in seconds.

Without this, a hub id that is not cached (most often a typo of an embedded name) on a
machine without network costs transformers' retries, about 50 s, before its error.
`hub_access` decides before anything is downloaded:

1. `HF_HUB_OFFLINE` set: the model must be in the local cache; else fail at once.
2. Else probe the hub (a TCP connection to its host, or to the HTTPS proxy, within
   `PROBE_SECONDS`). It answers: load normally (downloads allowed).
3. It does not answer: load from the local cache only (no retries), or fail at once if
   the model is not there.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

from ..errors import MemberLoadError

PROBE_SECONDS = 3.0
"""How long the probe waits for the hub (or the proxy) to accept a connection."""


def offline_mode() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) forbids the network."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def in_local_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the model's `config.json`."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=constants.HF_HUB_CACHE)
    except ValueError:  # not a valid repo id (HFValidationError is a ValueError)
        return False
    return isinstance(found, str)


def hub_address() -> tuple[str, int]:
    """(host, port) to probe: the HTTPS proxy if one is set, else the hub's endpoint."""
    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        value = os.environ.get(var)
        if value:
            proxy = urlsplit(value if "://" in value else "//" + value)
            return proxy.hostname or "", proxy.port or 80
    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether `hub_address()` accepts a TCP connection within `timeout` seconds.

    The probe runs in a daemon thread, so a name lookup that hangs costs no more than
    `timeout` either.
    """
    host, port = hub_address()
    answered = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="deepen-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()


def hub_access(repo_id: str, hint: str) -> bool:
    """Whether to load `repo_id` from the local cache only (True) or allow downloads;
    raises `MemberLoadError` (starting with `hint`) at once when it can come from
    neither.
    """
    cached = in_local_cache(repo_id)
    if offline_mode():
        if cached:
            return True
        raise MemberLoadError(
            f"{hint} It is not in the local Hugging Face cache ({_cache()}) and HF_HUB_OFFLINE "
            "is set, so the hub is not asked."
        )
    if reachable():
        return False
    if cached:
        return True
    host, port = hub_address()
    raise MemberLoadError(
        f"{hint} It is not in the local Hugging Face cache ({_cache()}) and the hub cannot be "
        f"reached ({host}:{port} did not answer within {PROBE_SECONDS:g} s)."
    )


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
