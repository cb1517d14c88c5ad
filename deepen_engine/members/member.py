"""What a member is: `MemberSpec` (what the user asks for: a source, a name, a device, a
dtype, where it runs) and `Member` (what is loaded: model, tokenizer, canonical
vocabulary), plus the names and identities of sources worked out without loading anything.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..alignment.vocabulary import CanonicalVocab
from ..devices import device_problem
from ..errors import ConfigError, validation_error
from .embedded import EMBEDDED
from .output_layer import OutputLayer
from .placement import (
    LOADING_FIELDS,
    STRATEGIES,
    check_cuda_for,
    check_device_map,
    check_max_memory,
    check_model_kwargs,
    input_embedding_weight,
    is_bitsandbytes,
    member_devices,
)

# Special tokens that end an assistant turn, in the chat formats we know.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|eom_id|>")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MemberSpec(BaseModel):
    """One ensemble member and where it runs.

    `source` is an embedded name (`smollm2-135m-instruct`, `gemma-3-270m`), a `.gguf`
    file, a local model folder, a Hugging Face hub id, or a ready `(model, tokenizer)`
    pair.

    `placement="ray"` runs the member in its own Ray actor (remote/backend.py), on
    the node Ray places it, with the resources `num_cpus`, `num_gpus` and `resources`;
    the other `ray` settings below apply to such members only. A bad value raises
    `ConfigError` naming the field.
    """

    model_config = ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, use_attribute_docstrings=True
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise validation_error("MemberSpec", exc) from None

    source: Any
    name: str | None = None
    """Display name; default: the embedded name, the file or folder name, or the hub id."""
    device: str = "cpu"
    """Torch device of the member, e.g. `cpu`, `cuda:0`; its weights load straight there.
    A member spread over several devices gives `device_map` instead."""
    dtype: str = "float32"
    """Weights' dtype: `float32`, `bfloat16` or `float16`, used as the weights load (a
    GGUF member is converted once per dtype)."""
    device_map: str | dict[str, int | str] | None = None
    """Where the member's modules run, as accelerate places them: `auto` / `balanced` /
    `balanced_low_0` / `sequential` (fill the GPUs, then the CPU, then disk, within
    `max_memory`), one device (`cuda:1`), or a dict of module name -> device (a CUDA index,
    `cpu`, `cuda:N`, or `disk`). `None`: the whole member on `device`."""
    max_memory: dict[int | str, int | str] | None = None
    """With a `device_map` strategy: the most each device may hold, e.g.
    `{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}` (sizes as bytes or `"150MiB"`)."""
    offload_folder: str | None = None
    """With a `device_map`: the folder for the weights offloaded to `disk`."""
    quantization: Literal["8bit", "4bit"] | None = None
    """Quantize the weights as they load with bitsandbytes (int8, or NF4 computing in
    `dtype`); needs a CUDA GPU and `pip install 'deepen[quantization]'`."""
    quantization_config: Any = None
    """A ready transformers quantization config (e.g. `BitsAndBytesConfig(...)`, or its
    dict), instead of `quantization`."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Further `from_pretrained` keywords (`attn_implementation`, `revision`,
    `trust_remote_code`, ...); not the ones the fields above set."""
    chat_template: str | None = None
    """Jinja chat template for this member, replacing its tokenizer's (see decoding/chat.py for the
    fallback when neither exists)."""
    placement: Literal["local", "ray"] = "local"
    """Where the member runs: `local` (in this process) or `ray` (in its own Ray actor, the
    model loaded where Ray places it; needs `pip install 'deepen[ray]'`)."""
    num_cpus: float = Field(1.0, gt=0)
    """ray: CPUs reserved for the member's actor; it runs `max(1, int(num_cpus))` torch
    threads."""
    num_gpus: float = Field(0.0, ge=0)
    """ray: GPUs reserved for the member's actor (with `device="cuda"`); fractions let
    members share a GPU (`0.5` each)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """ray: custom Ray resources the actor needs, e.g. `{"gpu_node_a": 1}` to place it on
    the node started with `ray start --resources='{"gpu_node_a": 1}'`."""
    address: str | None = None
    """ray: the Ray cluster, `HOST:6379` (or `auto`, `ray://HOST:10001`). `None`:
    `RAY_ADDRESS`, else the Ray this process already joined, else a new local Ray on this
    machine. The Ray members of one ensemble must name the same cluster."""
    step_timeout: float = Field(120.0, gt=0)
    """ray: seconds to wait for the actor's answer to one step (its forward pass
    included); past it the request fails with `MemberError` naming the member, and the
    actor is restarted."""
    load_timeout: float = Field(900.0, gt=0)
    """ray: seconds to wait for the actor to load its model (a first GGUF conversion
    included), or to come back after a restart."""
    max_restarts: int = Field(3, ge=-1)
    """ray: how many times Ray restarts the actor after it dies (`-1`: always)."""

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
        return value

    @field_validator("device_map")
    @classmethod
    def _check_device_map(cls, value: Any) -> Any:
        return None if value is None else check_device_map(value)

    @field_validator("max_memory", mode="before")
    @classmethod
    def _check_max_memory(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            raise ValueError(
                f"max_memory={value!r} must be a non-empty dict of device -> size, e.g. "
                "{0: '20GiB', 'cpu': '60GiB'}"
            )
        return check_max_memory(value)

    @field_validator("model_kwargs")
    @classmethod
    def _check_model_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_model_kwargs(value)

    @model_validator(mode="after")
    def _check_loading(self) -> MemberSpec:
        given = self.model_fields_set
        if isinstance(self.source, tuple) and (given & (LOADING_FIELDS | {"model_kwargs"})):
            named = ", ".join(sorted(given & (LOADING_FIELDS | {"model_kwargs"})))
            raise ValueError(
                f"{named} apply when deepen loads the model; a ready (model, tokenizer) pair is "
                "loaded already: pass those settings to its from_pretrained, or give its folder"
            )
        if self.device_map is not None and "device" in given:
            raise ValueError(
                f"device={self.device!r} and device_map={self.device_map!r} both place the "
                "member; give one (device_map='cuda:1' is the same as device='cuda:1')"
            )
        strategy = isinstance(self.device_map, str) and self.device_map in STRATEGIES
        if self.max_memory is not None and not strategy:
            raise ValueError(
                f"max_memory applies to a device_map strategy ('auto', 'balanced', ...), but "
                f"device_map={self.device_map!r}; add device_map='auto'"
            )
        if self.offload_folder is not None and self.device_map is None:
            raise ValueError(
                "offload_folder applies with a device_map that offloads to disk; add "
                "device_map='auto' (with max_memory) or a dict map with 'disk' entries"
            )
        if isinstance(self.device_map, dict) and "disk" in self.device_map.values():
            if self.offload_folder is None:
                raise ValueError(
                    "device_map puts modules on 'disk' but offload_folder is not set; give "
                    "offload_folder='/path/with/room'"
                )
        if self.quantization is not None and self.quantization_config is not None:
            raise ValueError(
                f"quantization={self.quantization!r} and quantization_config both quantize; "
                "give one"
            )
        if self.placement == "local":  # a Ray actor's CUDA is checked where it runs
            if self.quantization is not None:
                check_cuda_for(f"quantization={self.quantization!r}")
            elif self.quantization_config is not None and is_bitsandbytes(self.quantization_config):
                check_cuda_for("quantization_config (bitsandbytes)")
        return self

    @model_validator(mode="after")
    def _check_placement(self) -> MemberSpec:
        ray_only = RAY_FIELDS & self.model_fields_set
        if self.placement == "local" and ray_only:
            named = ", ".join(f"{f}={getattr(self, f)!r}" for f in sorted(ray_only))
            raise ValueError(
                f"{named} {'applies' if len(ray_only) == 1 else 'apply'} to placement='ray' "
                "only; add placement='ray' to run the member in a Ray actor, or leave it out"
            )
        if self.placement != "ray":
            # a device this process lacks fails here, before any model loads (a Ray
            # actor's device is checked where the actor runs)
            problem = device_problem(self.device)
            if problem is not None:
                raise ValueError(f"device {problem}")
            return self
        if not isinstance(self.source, (str, Path)):
            raise ValueError(
                "placement='ray' loads the model in its actor, from a name: give an embedded "
                "name, a .gguf file, a model folder or a hub id, not a ready object"
            )
        on_gpu = self.device.startswith("cuda")
        if self.num_gpus > 0 and not on_gpu and self.device_map is None:
            raise ValueError(
                f"num_gpus={self.num_gpus} reserves a GPU but device={self.device!r}; add "
                "device='cuda' (Ray makes the actor's GPU its cuda:0)"
            )
        if on_gpu and self.num_gpus == 0:
            raise ValueError(
                f"device={self.device!r} in a Ray actor needs num_gpus > 0: Ray hides the "
                "GPUs from an actor that reserves none"
            )
        return self


@dataclass
class Member:
    """A loaded member: model, tokenizer and its canonical vocabulary."""

    name: str
    model: Any  # a transformers causal LM
    tokenizer: Any  # a fast transformers tokenizer
    vocab: CanonicalVocab
    device: torch.device
    dtype: torch.dtype
    source_kind: str  # "embedded", "gguf", "folder", "hub" or "object"
    load_seconds: float
    eos_ids: frozenset[int] = field(default_factory=frozenset)
    cache_argument: str = "past_key_values"  # transformers >= 5.x names it `cache`
    chat_template: str | None = None
    # The link to the process that runs this member (a Ray actor, remote/backend.py),
    # or None when it runs here. `model` is then a `RemoteModel`: config and embeddings.
    remote: Any = None
    # Seconds in this member's forward passes since it loaded, all requests together
    # (the server's `deepen_member_forward_seconds_total`); added to by the decoding loop.
    forward_seconds: float = 0.0
    # accelerate's placement of a sharded or offloaded member (module -> device), else
    # None. `device` is then where its input ids go; its logits come back from its last
    # layer's device (fusion reads them where they are).
    device_map: dict[str, Any] | None = None
    # The output layer the engine applies itself (members/output_layer.py), or None: the
    # model's own forward computes the logits.
    output_layer: OutputLayer | None = None

    @property
    def devices(self) -> frozenset[str]:
        """Every device the member runs layers on (`disk` and CPU offload count as `cpu`)."""
        return member_devices(self.device_map, self.device)

    def input_embedding_weight(self) -> torch.Tensor:
        """The (V, d) input embeddings with their values, offloaded ones included."""
        return input_embedding_weight(self.model)

    @property
    def num_parameters(self) -> int:
        """Parameter count of the model."""
        if self.remote is not None:
            return int(self.remote.num_parameters)
        return sum(p.numel() for p in self.model.parameters())

    @property
    def context_window(self) -> int | None:
        """Longest sequence the model was configured for, if it says."""
        return getattr(self.model.config, "max_position_embeddings", None)


RAY_FIELDS = frozenset(
    {"num_cpus", "num_gpus", "resources", "address", "step_timeout", "load_timeout", "max_restarts"}
)


def cache_dir() -> Path:
    """Where converted GGUF members are kept: `$DEEPEN_CACHE` or `~/.cache/deepen`."""
    if os.environ.get("DEEPEN_CACHE"):
        return Path(os.environ["DEEPEN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepen"


def as_spec(item: Any) -> MemberSpec:
    """Turn what a user passes for one member into a `MemberSpec`."""
    if isinstance(item, MemberSpec):
        return item
    if isinstance(item, (str, Path, tuple)):
        return MemberSpec(source=item)
    if isinstance(item, dict):
        try:
            return MemberSpec(**item)
        except Exception as exc:
            raise ConfigError(f"Bad member settings {item!r}: {exc}") from None
    raise ConfigError(
        f"Cannot use {item!r} as a member: give a name, path or hub id (str), a "
        "(model, tokenizer) pair, or a MemberSpec."
    )


def display_name(member: Any) -> str:
    """The name a member will have once loaded, found without loading anything.

    `member` is anything `Ensemble` takes for one member: a `MemberSpec`, an embedded
    name, a path, a hub id or a `(model, tokenizer)` pair.
    """
    spec = as_spec(member)
    if spec.name:
        return spec.name
    source = spec.source
    if isinstance(source, tuple):
        return object_name(source[0]) if source else "(model, tokenizer) pair"
    text = str(source)
    if text in EMBEDDED:
        return text
    path = Path(text).expanduser()
    return path.name if path.exists() else text


def source_key(spec: MemberSpec) -> tuple[str, Any]:
    """What identifies a member's model, whatever its name, device or dtype: the same
    embedded name, the same file or folder (resolved), the same hub id, or the same model
    object.
    """
    source = spec.source
    if isinstance(source, tuple):
        return ("object", id(source[0]) if source else id(source))
    text = str(source)
    if text in EMBEDDED:
        return ("embedded", text)
    path = Path(text).expanduser()
    if path.exists():
        return ("path", str(path.resolve()))
    return ("hub", text)


def not_found_hint(text: str) -> str:
    """What to say when `text` names no embedded model, file or folder (the hub part is
    added by whoever tried the hub), with the embedded name it most likely meant.
    """
    close = near_embedded_name(text)
    guess = f" Did you mean {close!r}?" if close else ""
    return (
        f"Member {text!r} is not an embedded name ({', '.join(EMBEDDED)}) nor an existing "
        f"file or folder.{guess}"
    )


def near_embedded_name(text: str) -> str | None:
    """The embedded name `text` most likely means: the same letters and digits (case,
    dashes and a hub owner aside: `HuggingFaceTB/SmolLM2-135M-Instruct`), a start of one
    (`smollm2`), or a close spelling (`gemma-3-27m`).
    """

    def key(name: str) -> str:
        return "".join(ch for ch in name.rsplit("/", 1)[-1].lower() if ch.isalnum())

    wanted = key(text)
    if len(wanted) >= 4:
        for name in EMBEDDED:
            if key(name).startswith(wanted):
                return name
    close = difflib.get_close_matches(text.lower(), list(EMBEDDED), n=1)
    return close[0] if close else None


def object_name(model: Any) -> str:
    """A name for a ready model object: its folder name, else its class name."""
    path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return Path(path).name or type(model).__name__
