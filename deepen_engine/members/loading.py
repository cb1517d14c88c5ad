"""Loading ensemble members: embedded names, `.gguf` files, local folders, hub ids, or a
ready `(model, tokenizer)` pair.

A GGUF member is converted once (dequantised, tokenizer rebuilt) and saved as a plain
transformers folder under the cache directory (`$DEEPEN_CACHE`, default
`~/.cache/deepen`); later loads read that folder in seconds (conversion.py).
"""

from __future__ import annotations

import hashlib
import inspect
import time
from pathlib import Path
from typing import Any

import torch

from ..alignment.vocabulary import CanonicalVocab
from ..errors import ConfigError, MemberLoadError
from ..heap import release_freed_heap
from .conversion import ensure_folder
from .embedded import EMBEDDED, embedded_gguf
from .hub import hub_access
from .member import (
    DTYPES,
    END_OF_TURN_TOKENS,
    Member,
    MemberSpec,
    cache_dir,
    display_name,
    not_found_hint,
    object_name,
)
from .output_layer import OutputLayer
from .placement import check_module_names, input_device, load_keywords
from .quiet import quiet_loading
from .tokenizer_file import load_tokenizer


def load_local_member(spec: MemberSpec) -> Member:
    """Load one member in this process; errors name the member and what to do.

    A member placed in a Ray actor loads through `deepen_engine.load_member` (remote/).
    """
    if spec.placement == "ray":
        raise ConfigError(
            f"{display_name(spec)} has placement='ray': load it with deepen_engine.load_member "
            "or an Ensemble, which start its Ray actor."
        )
    start = time.perf_counter()
    dtype = DTYPES[spec.dtype]
    source = spec.source
    if isinstance(source, tuple):
        model, tokenizer = _check_pair(source, spec.name)
        name, kind = spec.name or object_name(model), "object"
        model = model.to(spec.device)
    else:
        with quiet_loading():  # deepen's own bar only (converting a GGUF file)
            name, kind, tokenizer, model = _load_source(source, spec, dtype)
    model = model.eval()
    # accelerate's map when it placed the modules (a strategy or dict map, or offload)
    device_map = getattr(model, "hf_device_map", None) if spec.device_map is not None else None
    device = input_device(model, device_map, spec.device)
    vocab = CanonicalVocab.from_tokenizer(tokenizer, _vocab_rows(model), member=name)
    _check_round_trip(tokenizer, vocab, name)
    member = Member(
        name=name,
        model=model,
        tokenizer=tokenizer,
        vocab=vocab,
        device=device,
        dtype=_weights_dtype(model, dtype),
        source_kind=kind,
        load_seconds=time.perf_counter() - start,
        eos_ids=_eos_ids(model, tokenizer),
        cache_argument=_cache_argument(model),
        chat_template=spec.chat_template,
        device_map=dict(device_map) if device_map else None,
        output_layer=OutputLayer.of(model, device_map),
    )
    release_freed_heap()  # what the vocabulary and the checks above freed
    return member


def _load_source(
    source: str | Path, spec: MemberSpec, dtype: torch.dtype
) -> tuple[str, str, Any, Any]:
    """(name, kind, tokenizer, model) of an embedded name, file, folder or hub id."""
    default_name, kind, folder = _resolve(source, spec.dtype)
    name = spec.name or default_name
    # a hub id: fail in seconds when it can come from neither the cache nor the hub
    local_only = kind == "hub" and hub_access(folder, not_found_hint(folder))
    if isinstance(spec.device_map, dict):
        try:
            check_module_names(folder, spec.device_map, local_only)
        except ValueError as exc:
            raise ConfigError(f"MemberSpec.{exc} (member {name!r})") from None
    try:
        kwargs = load_keywords(spec, dtype)
        tokenizer, model = _load_folder_or_hub(folder, name, kwargs, local_only)
    except MemberLoadError as exc:
        if kind != "hub":
            raise
        # Most often a typo in an embedded name or a path: say what was tried.
        raise MemberLoadError(
            f"{not_found_hint(folder)} Loading it as a hub id failed: {exc}"
        ) from exc.__cause__
    return name, kind, tokenizer, model


def _resolve(source: str | Path, dtype: str = "float32") -> tuple[str, str, str]:
    """(display name, kind, folder or hub id to load) for a str or path source; a GGUF
    source is converted once per `dtype` (a float32 and a bfloat16 folder side by side).
    """
    text = str(source)
    # float32 folders keep their old names (caches made before dtypes were kept)
    suffix = "" if dtype == "float32" else f"-{dtype}"
    if text in EMBEDDED:
        entry = EMBEDDED[text]
        key = f"{text}-{entry.version()}" if entry.installed() else text
        folder = cache_dir() / "models" / (key + suffix)
        ensure_folder(folder, lambda: embedded_gguf(text), text, DTYPES[dtype])
        return text, "embedded", str(folder)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            stat = path.stat()
            digest = hashlib.sha256(
                f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
            ).hexdigest()[:16]
            folder = cache_dir() / "models" / f"{path.stem}-{digest}{suffix}"
            ensure_folder(folder, lambda: path, text, DTYPES[dtype])
            return path.name, "gguf", str(folder)
        if path.is_dir():
            return path.name, "folder", str(path)
        raise MemberLoadError(
            f"Member {text!r} is a file but not a .gguf file; give a .gguf file or a model folder."
        )
    if text.endswith(".gguf") or text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise MemberLoadError(
            f"Member {text!r}: the path does not exist. Give an existing .gguf file or model "
            f"folder, a hub id, or an embedded name ({', '.join(EMBEDDED)})."
        )
    return text, "hub", text


def _load_folder_or_hub(
    where: str, name: str, kwargs: dict[str, Any], local_only: bool = False
) -> tuple[Any, Any]:
    """Tokenizer and model from a folder or a hub id (`local_only`: the cache alone),
    the model loaded with the `from_pretrained` keywords `kwargs` (placement.py).
    """
    from transformers import AutoModelForCausalLM

    try:
        tokenizer = load_tokenizer(where, local_only)
    except Exception as exc:
        raise MemberLoadError(f"Member {name!r}: the tokenizer could not be loaded: {exc}") from exc
    # before the model is built: its objects would land among the pages the parse freed
    # and keep them from being handed back
    release_freed_heap()
    try:
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=local_only, **kwargs)
    except ValueError as exc:
        placing = PLACEMENT_WORDS & set(kwargs)
        if placing and any(word in str(exc) for word in PLACEMENT_WORDS):
            field = sorted(placing)[0]
            raise ConfigError(
                f"Member {name!r}: MemberSpec.{field}: transformers could not place the weights: "
                f"{exc}"
            ) from exc
        raise MemberLoadError(
            f"Member {name!r} is not a causal language model transformers can load: {exc}"
        ) from exc
    except OSError as exc:
        raise MemberLoadError(f"Member {name!r}: the weights could not be loaded: {exc}") from exc
    return tokenizer, model


def _check_pair(pair: tuple[Any, ...], name: str | None) -> tuple[Any, Any]:
    label = name or "(model, tokenizer) pair"
    if len(pair) != 2:
        raise MemberLoadError(f"Member {label}: give exactly (model, tokenizer), got {len(pair)}.")
    model, tokenizer = pair
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise MemberLoadError(
            f"Member {label}: {type(model).__name__} is not a transformers causal LM "
            "(it needs get_input_embeddings() and logits from forward)."
        )
    if not getattr(tokenizer, "is_fast", False) and not hasattr(tokenizer, "backend_tokenizer"):
        raise MemberLoadError(
            f"Member {label}: {type(tokenizer).__name__} is not a fast (Rust) tokenizer; "
            "load it with AutoTokenizer.from_pretrained(...)."
        )
    return model, tokenizer


PLACEMENT_WORDS = frozenset({"device_map", "max_memory", "offload_folder", "quantization_config"})


def _weights_dtype(model: Any, asked: torch.dtype) -> torch.dtype:
    """The dtype the member computes in: its first real floating-point parameter's (a
    quantized member's int8/uint8 storage and offloaded meta weights aside), else `asked`.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.device.type != "meta":
            return p.dtype
    return asked


# Why loading calls `release_freed_heap` (heap.py): reading a tokenizer allocates far more
# than it keeps (Gemma-3's peaks about 200 MB above the 74 MB it keeps, tokenizer_file.py),
# and glibc keeps the freed pages, which lie between the kept ones, mapped. Weights are
# memory-mapped files and cannot reuse them, so without a trim every process holding the
# member would carry them beside its weights.


def _vocab_rows(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _check_round_trip(tokenizer: Any, vocab: CanonicalVocab, name: str) -> None:
    """Generated text is re-tokenised piece by piece: encoding must not add text."""
    probe = "a b"
    ids = tokenizer(probe, add_special_tokens=False).input_ids
    got = b"".join(vocab.texts[i] or b"" for i in ids)
    if got != probe.encode():
        raise MemberLoadError(
            f"Member {name!r}: its tokenizer turns {probe!r} into {got.decode(errors='replace')!r} "
            "(it adds text, e.g. a SentencePiece dummy-prefix space). Such tokenizers are not "
            "supported yet: the shared generated text would gain that text in this member."
        )


def _cache_argument(model: Any) -> str:
    """The forward keyword for the KV cache: `cache` in newer transformers, else the old one."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    # End-of-turn markers end a reply too (Gemma's <end_of_turn> is not its eos token).
    special = set(getattr(tokenizer, "all_special_ids", []))
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    # one lookup per marker, not get_vocab(): a dict of every token (262k for Gemma-3)
    marks = (tokenizer.backend_tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)
    ids.update(i for i in marks if i is not None and i in special)
    return frozenset(ids)
