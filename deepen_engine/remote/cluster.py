"""Joining a Ray cluster for members placed in Ray actors, and checking, before any model
loads, that it can hold them.

Which cluster: a Ray this process already joined is used as it is; else the members'
`address`, else `RAY_ADDRESS`, else a new local Ray on this machine (Ray's own rule for
`ray.init()`). An address that does not answer raises `ConfigError` at once (Ray itself
would retry for minutes); so do members that ask for more than the cluster has.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from ..members.member import MemberSpec, display_name

_REACH_SECONDS = 5.0  # how long a cluster address may take to accept a connection


def import_ray() -> ModuleType:
    """The `ray` module, or `ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "placement='ray' needs Ray, which is not installed: pip install 'deepen[ray]' "
            "(or pip install 'ray>=2.30'), or leave placement at 'local'."
        ) from None
    return ray


def cluster_address(specs: Sequence[MemberSpec]) -> str | None:
    """The one address the Ray members name (None if they name none); they must agree."""
    named = {s.address for s in specs if s.address is not None}
    if len(named) > 1:
        raise ConfigError(
            f"The Ray members name different clusters ({', '.join(sorted(named))}); one "
            "ensemble joins one cluster: give every member the same address, or none."
        )
    return named.pop() if named else None


def connect(address: str | None) -> ModuleType:
    """Join the cluster (see the module docstring); returns the `ray` module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    target = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
    if target is None:
        # A Ray started here runs workers from this machine: let them import this very
        # deepen_engine, even when it is a source checkout rather than an installed package.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    elif target != "auto":
        _check_reachable(target)
    try:
        ray.init(address=target, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"Cannot join the Ray cluster at {target!r} ({exc}). Start one with "
            "`ray start --head` on its first node, or give its address (MemberSpec.address "
            "or RAY_ADDRESS); with neither, deepen starts a local Ray on this machine."
        ) from None
    return ray


def _check_reachable(address: str) -> None:
    """`ConfigError` unless something listens at the address's host and port."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379, or "
            "ray://10.0.0.1:10001 for Ray Client); fix MemberSpec.address or RAY_ADDRESS."
        )
    try:
        with socket.create_connection((host, int(port)), timeout=_REACH_SECONDS):
            pass
    except OSError as exc:
        raise ConfigError(
            f"Cannot reach the Ray cluster at {address!r} ({type(exc).__name__}: {exc}). "
            f"Start it with `ray start --head --port={port}` on {host}, or fix "
            "MemberSpec.address or RAY_ADDRESS."
        ) from None


def demand(spec: MemberSpec) -> dict[str, float]:
    """The Ray resources a member's actor reserves."""
    out = {"CPU": spec.num_cpus, **spec.resources}
    if spec.num_gpus:
        out["GPU"] = spec.num_gpus
    return out


def check_resources(ray: ModuleType, specs: Sequence[MemberSpec]) -> None:
    """`ConfigError` when some member fits no node, or all of them together do not fit
    what the cluster has free now: such actors would wait for resources forever.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for spec in specs:
        need = demand(spec)
        if not any(_covers(node, need) for node in nodes):
            raise ConfigError(
                f"Member {display_name(spec)!r} asks Ray for {_show(need)}, but no node of "
                f"the cluster has that much ({'; '.join(_show(_public(n)) for n in nodes)}). "
                "Lower its num_cpus, num_gpus or resources, or add a node that has them "
                "(`ray start --address=HEAD:6379 --num-gpus=1`)."
            )
    total: dict[str, float] = {}
    for spec in specs:
        for key, value in demand(spec).items():
            total[key] = total.get(key, 0.0) + value
    free = ray.available_resources()
    short = {k: v for k, v in total.items() if v > free.get(k, 0.0) + 1e-9}
    if short:
        have = ", ".join(f"{k}={free.get(k, 0.0):g}" for k in short)
        raise ConfigError(
            f"The Ray members ask for {_show(short)} in all, but the cluster has {have} "
            "free now. Lower their num_cpus (fractions are fine, e.g. 0.5), num_gpus or "
            "resources, or free or add resources (other actors hold the rest)."
        )


def _covers(node: dict[str, float], need: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _public(node: dict[str, float]) -> dict[str, float]:
    """A node's resources without Ray's internal ones (node ids, memory in bytes)."""
    hidden = ("node:", "memory", "object_store_memory", "accelerator_type")
    return {k: v for k, v in node.items() if not k.startswith(hidden)}


def _show(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"
