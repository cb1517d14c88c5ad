"""Where a member's weights go when it loads: accelerate's `device_map` (a strategy such
as `"auto"`, one device, or module -> device), `max_memory`, `offload_folder`,
bitsandbytes quantization, and the `from_pretrained` keywords they become.

The `MemberSpec` validators call the `check_*` functions here (each raises `ValueError`
naming the field, which `MemberSpec` turns into a `ConfigError`); `load_keywords` turns a
checked spec into the keywords `from_pretrained` takes, so the weights load straight to
the device they run on, in the member's dtype, with no float32 CPU copy first.

A sharded member (its layers on several devices, or some on the CPU or disk) is one
model to the rest of deepen: its inputs go to `input_device` (the first device that
runs layers), its logits come back wherever its last layer runs (accelerate's hooks move
them to the input device), and fusion reads them where they are (deepen_engine/devices.py).
The KV cache's layers live where their layers run (decoding/member_batch.py indexes each
on its own device). Offloaded embeddings are read from accelerate's weights map
(`input_embedding_weight`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..devices import device_problem
from ..errors import ConfigError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's device-map strategies: fill the devices it finds (GPUs, then the CPU, then
disk), within `max_memory`."""

QUANTIZATIONS = ("8bit", "4bit")
"""`MemberSpec.quantization`'s values: bitsandbytes' int8 and NF4 (CUDA only)."""

LOADING_FIELDS = frozenset(
    {"device_map", "max_memory", "offload_folder", "quantization", "quantization_config"}
)
"""MemberSpec fields that decide how the weights load (a ready model object takes none)."""

# from_pretrained keywords deepen sets itself -> the MemberSpec field that sets them
_RESERVED_KWARGS = {
    "dtype": "dtype",
    "torch_dtype": "dtype",
    "device_map": "device_map",
    "max_memory": "max_memory",
    "offload_folder": "offload_folder",
    "quantization_config": "quantization or quantization_config",
    "load_in_8bit": "quantization='8bit'",
    "load_in_4bit": "quantization='4bit'",
    "gguf_file": "source (a .gguf file)",
    "local_files_only": "source (deepen decides it: HF_HUB_OFFLINE or a hub probe)",
}


def check_device_map(value: Any) -> Any:
    """A strategy, one device, or a non-empty dict of module name -> device (an int is a
    CUDA index, `"disk"` offloads to `offload_folder`).
    """
    if isinstance(value, str):
        if value in STRATEGIES:
            return value
        problem = device_problem(value)
        if problem is not None:
            raise ValueError(
                f"device_map={value!r} is neither a strategy ({', '.join(STRATEGIES)}) nor a "
                f"usable device: {problem}"
            )
        return value
    if isinstance(value, dict):
        if not value:
            raise ValueError(
                "device_map={} places nothing; give module -> device pairs, e.g. "
                "{'model.embed_tokens': 0, 'model.layers': 0, 'lm_head': 1}, or 'auto'"
            )
        out: dict[str, int | str] = {}
        for module, device in value.items():
            if not isinstance(module, str):
                raise ValueError(f"device_map key {module!r} is not a module name (a str)")
            out[module] = _map_device(module, device)
        return out
    raise ValueError(
        f"device_map={value!r} must be a strategy ({', '.join(STRATEGIES)}), a device such as "
        "'cuda:0', or a dict of module name -> device"
    )


def _map_device(module: str, device: Any) -> int | str:
    """One device of a dict device map: an int (CUDA index), `"disk"`, or a device name."""
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise ValueError(
            f"device_map[{module!r}]={device!r} is not a device; give a CUDA index, 'cpu', "
            "'cuda:N' or 'disk'"
        )
    if isinstance(device, str) and device.isdigit():
        device = int(device)  # JSON and the command line give indices as text
    if device == "disk":
        return device
    name = f"cuda:{device}" if isinstance(device, int) else device
    problem = device_problem(name)
    if problem is not None:
        raise ValueError(f"device_map[{module!r}]={device!r}: {problem}")
    return device


def check_max_memory(value: dict[Any, Any]) -> dict[int | str, int | str]:
    """Keys: a CUDA index (or `cuda:N`), `cpu`, `mps` or `disk`; values: bytes or a size
    such as `"20GiB"`/`"150MiB"`.
    """
    from accelerate.utils import convert_file_size_to_int

    out: dict[int | str, int | str] = {}
    for key, size in value.items():
        where: int | str = key
        if isinstance(key, str) and key.startswith("cuda:") and key[5:].isdigit():
            where = int(key[5:])
        elif isinstance(key, str) and key.isdigit():
            where = int(key)
        if isinstance(where, bool) or not (
            isinstance(where, int) and where >= 0 or where in ("cpu", "mps", "disk")
        ):
            raise ValueError(
                f"max_memory key {key!r} is not a device; give a CUDA index (0, 'cuda:0'), "
                "'cpu', 'mps' or 'disk'"
            )
        try:
            if isinstance(size, bool) or convert_file_size_to_int(size) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(
                f"max_memory[{key!r}]={size!r} is not a size; give bytes (an int > 0) or a "
                "size such as '20GiB' or '150MiB'"
            ) from None
        out[where] = size
    return out


def check_model_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    """Anything else `from_pretrained` takes (`attn_implementation`, `revision`,
    `trust_remote_code`, ...), but not what a MemberSpec field sets.
    """
    for key in value:
        if key in _RESERVED_KWARGS:
            raise ValueError(
                f"model_kwargs[{key!r}] is set by deepen; use the MemberSpec field "
                f"{_RESERVED_KWARGS[key]} instead"
            )
    return value


def is_bitsandbytes(config: Any) -> bool:
    """Whether a `quantization_config` (object or dict) asks for bitsandbytes."""
    if isinstance(config, dict):
        method = str(config.get("quant_method", ""))
        return method == "bitsandbytes" or bool(
            config.get("load_in_4bit") or config.get("load_in_8bit")
        )
    method = getattr(config, "quant_method", "")
    return "bitsandbytes" in str(getattr(method, "value", method))


def check_cuda_for(what: str) -> None:
    """Bitsandbytes runs on CUDA: say so on a machine without it."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"{what} quantizes with bitsandbytes, which needs a CUDA GPU, and this machine has "
            "none (torch.cuda.is_available() is False); leave it out to load the member "
            "unquantized, e.g. dtype='bfloat16'"
        )


def quantization_config(quantization: str | None, ready: Any, dtype: torch.dtype) -> Any:
    """The `quantization_config` to load with: the ready one, one made for `"8bit"` /
    `"4bit"` (computing in the member's dtype), or None.
    """
    if ready is not None:
        if isinstance(ready, dict):
            from transformers.quantizers.auto import AutoQuantizationConfig

            return AutoQuantizationConfig.from_dict(dict(ready))
        return ready
    if quantization is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"MemberSpec.quantization={quantization!r} needs bitsandbytes, which is not "
            "installed; install it with: pip install 'deepen[quantization]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    compute = dtype if dtype != torch.float32 else torch.bfloat16
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
    )


def load_keywords(spec: Any, dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` keywords of a checked MemberSpec: its dtype, where its weights
    go (`device_map`, or its one `device` when that is not the CPU: loaded there
    directly), memory limits, offload folder, quantization and `model_kwargs`.
    """
    out: dict[str, Any] = dict(spec.model_kwargs)
    out["dtype"] = dtype
    quant = quantization_config(spec.quantization, spec.quantization_config, dtype)
    if spec.device_map is not None:
        out["device_map"] = spec.device_map
    elif quant is not None or spec.device != "cpu":
        out["device_map"] = spec.device  # straight onto the device, no CPU copy first
    if quant is not None:
        out["quantization_config"] = quant
    if spec.max_memory is not None:
        out["max_memory"] = spec.max_memory
    if spec.offload_folder is not None:
        out["offload_folder"] = str(spec.offload_folder)
    return out


def check_module_names(where: str, device_map: dict[str, Any], local_only: bool) -> None:
    """Every key of a dict device map names a module of the model at `where`, and every
    parameter has a device (transformers would quietly load the rest elsewhere). Builds
    the model's skeleton on the meta device: no weights are read.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(where, local_files_only=local_only)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    modules = {name for name, _ in skeleton.named_modules()}
    unknown = [m for m in device_map if m not in modules]
    if unknown:
        near = sorted(n for n in modules if n.count(".") <= 1 and n)[:8]
        raise ValueError(
            f"device_map names {unknown!r}, which the model does not have; its modules "
            f"include {near}"
        )

    def placed(param: str) -> bool:
        return "" in device_map or any(param == m or param.startswith(m + ".") for m in device_map)

    missing = [p for p, _ in skeleton.named_parameters() if not placed(p)]
    if missing:
        raise ValueError(
            f"device_map gives no device to {len(missing)} parameter(s), e.g. {missing[0]!r}; "
            "add their modules (or a parent module) to the map"
        )


def input_device(model: Any, device_map: dict[str, Any] | None, fallback: str) -> torch.device:
    """Where a member's input ids go: the first device in its map that runs layers (a GPU
    before the CPU; accelerate moves activations on from there), else `fallback`.
    """
    if not device_map:
        return torch.device(fallback)
    devices = [d for d in device_map.values() if d not in ("cpu", "disk", "meta")]
    if devices:
        first = devices[0]
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    return torch.device("cpu")


def member_devices(device_map: dict[str, Any] | None, device: torch.device) -> frozenset[str]:
    """Every device a member runs layers on (its map's, disk and CPU-offload counted as
    the CPU), or its one device.
    """
    if not device_map:
        return frozenset({str(device)})
    return frozenset(
        f"cuda:{d}" if isinstance(d, int) else ("cpu" if d == "disk" else str(d))
        for d in device_map.values()
    )


def input_embedding_weight(model: Any) -> torch.Tensor:
    """The (V, d) input embedding matrix with its values, even when accelerate offloaded
    it (its parameter is then on the meta device, the values in the hook's weights map,
    on the CPU or memory-mapped from the offload folder).
    """
    module = model.get_input_embeddings()
    weight: torch.Tensor = module.weight
    if weight.device.type != "meta":
        return weight
    hook = getattr(module, "_hf_hook", None)
    weights_map = getattr(hook, "weights_map", None)
    if weights_map is None:
        raise RuntimeError(
            "the member's input embeddings are on the meta device with no offload map to read "
            "them from; load it with a device_map that keeps 'model.embed_tokens' on a device"
        )
    return weights_map["weight"]
