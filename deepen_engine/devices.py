"""Devices: checking a device setting, and where fusion runs (the fusion device, copies of
constant tables on the devices that read them).

Each member's logits stay on the member's device (a member in a Ray actor sends them to
the CPU). The work that reads one member's logits alone runs there (its probabilities,
its top tokens, DeePEn's relative distribution); the aggregation, the inverse search and
the fused logits run on the fusion device: `FusionConfig.fusion_device`, or by default
the device of the main member's logits. Sampling and grammar masks follow the fused
logits. docs/design.md ("Where fusion runs") lists what crosses between devices.

The fusion methods' tables (which tokens have text, token maps, anchor maps, weights) are
built once on the CPU. `DeviceCopies.on(table, device)` gives the table itself when it is
already there (always so when everything runs on the CPU: no copy, no cost) and else a
copy made on first use and kept, so no table crosses a device at every step.
"""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device `name` with its index: `cuda` becomes `cuda:<current>`, so it
    compares equal to the device of the tensors placed on it.
    """
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_problem(name: str) -> str | None:
    """What is wrong with `name` as a device for this process, or None when it is usable:
    a name torch does not know, or a CUDA device this machine lacks.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name!r} is not a torch device; give e.g. 'cpu', 'cuda' or 'cuda:1'"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (
                f"{name!r} needs CUDA, which this machine lacks (torch.cuda.is_available() is "
                "False: no GPU, or a CPU build of torch); use 'cpu', or leave it unset"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"{name!r} does not exist: this machine has {count} CUDA device(s)"
    elif device.type not in ("cpu", "mps"):
        return f"{name!r}: deepen runs on 'cpu' and 'cuda' devices (and 'mps', untested)"
    return None


def check_device(name: str, what: str) -> str:
    """`name` unchanged, or `ConfigError` naming `what` when it is not usable here."""
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(f"{what}: {problem}.")
    return name


class DeviceCopies:
    """Copies of constant tables on other devices, each made once (module docstring)."""

    def __init__(self) -> None:
        self._copies: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._sources: dict[int, torch.Tensor] = {}  # keeps each source alive: its id stays its

    def on(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`table` on `device`: itself when it is there, else its kept copy."""
        if table.device == device:
            return table
        key = (id(table), device)
        copy = self._copies.get(key)
        if copy is None:
            copy = table.to(device)
            self._copies[key] = copy
            self._sources[id(table)] = table
        return copy
