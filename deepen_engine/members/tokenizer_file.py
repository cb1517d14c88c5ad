"""A member's tokenizer read from its folder's `tokenizer.json` with less resident memory
than `AutoTokenizer.from_pretrained` keeps, and the same tokenizer.

For a folder whose `tokenizer_config.json` names transformers' generic `TokenizersBackend`
class (every GGUF conversion writes one: conversion.py), transformers has the Rust
`tokenizers` library parse `tokenizer.json`. That parser first reads the model into JSON
values (a tree node for every few vocabulary entries) and then moves each piece out of
them, so the pieces it keeps end up between the nodes it frees: for Gemma-3-270m (262,144
pieces, 514,906 merges) about 16 MB of holes that the heap cannot give back, since no
page of them is wholly free (`malloc_trim` returns whole pages only).

Here the BPE model is built from Python objects instead (`tokenizers.models.BPE(vocab,
merges)`): the JSON is parsed by Python, whose objects live in its own arenas, freed as a
whole once the model is built, and the Rust side allocates only what it keeps, one piece
after the other. The rest of `tokenizer.json` (normalizer, pre-tokenizer, post-processor,
decoder, padding, truncation) is read by `tokenizers` itself from the file without the
model's vocabulary, then the model is set and the added tokens are added, in the order
the Rust parser adds them: `backend.to_str()` is the same string as after
`tokenizers.Tokenizer.from_file` (tests/unit/test_tokenizer_file.py,
tests/integration/test_conversion.py). The `TokenizersBackend` wrapped around it is built
by the same `from_pretrained` code, from the same files. Gemma-3's tokenizer keeps 74 MB
this way against 93 MB (`scripts/tokenizer_memory.py`); its parse peaks higher, at 282-299
MB against 164 (the Python objects), before any weight is read.

Any other folder or hub id loads with `AutoTokenizer.from_pretrained`, as does a
`tokenizer.json` whose model is not BPE (then read by `tokenizers.Tokenizer.from_file`).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

GENERIC_CLASS = "TokenizersBackend"
# the fields of a BPE model in tokenizer.json; each but the first three is a keyword of
# `tokenizers.models.BPE` (a field this list lacks: read by `Tokenizer.from_file` instead)
_BPE_FIELDS = frozenset(
    {
        "type",
        "vocab",
        "merges",
        "dropout",
        "unk_token",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "fuse_unk",
        "byte_fallback",
        "ignore_merges",
    }
)


def load_tokenizer(where: str, local_only: bool = False) -> Any:
    """The tokenizer of the folder or hub id `where`, as `AutoTokenizer.from_pretrained`
    loads it; a folder with a generic BPE `tokenizer.json` is read as the module docstring
    says.
    """
    if generic_folder(where):
        return _reader_class().from_pretrained(where, local_files_only=local_only)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(where, local_files_only=local_only)


def generic_folder(where: str) -> bool:
    """Whether `where` is a folder whose `tokenizer_config.json` names the generic class
    (no remote code) and which has a `tokenizer.json`.
    """
    folder = Path(where)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(config, dict)
        and config.get("tokenizer_class") == GENERIC_CLASS
        and "auto_map" not in config
        and (folder / "tokenizer.json").is_file()
    )


def read_backend(path: str | Path) -> Any:
    """The Rust tokenizer that `tokenizers.Tokenizer.from_file(path)` gives, its BPE model
    built from Python objects (module docstring).
    """
    import tokenizers
    from tokenizers.models import BPE

    # What outlives the parse is made before it (`_first_use`): made among the parse's
    # objects, it would keep their arena of Python's allocator (1 MiB) from being freed.
    _first_use()
    backend = tokenizers.Tokenizer(BPE())  # filled in below
    with open(path, encoding="utf-8") as handle:
        spec = json.load(handle)
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or set(model) - _BPE_FIELDS:
        return tokenizers.Tokenizer.from_file(str(path))  # not a BPE model this code knows
    vocab, merges = model.pop("vocab"), model.pop("merges")
    added = [_added_token(token) for token in spec.pop("added_tokens", None) or []]
    options = {key: value for key, value in model.items() if key != "type" and value is not None}
    for i, merge in enumerate(merges):  # in place: each "a b" string is freed as it goes
        merges[i] = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
    try:
        bpe = BPE(vocab, merges, **options)
    except Exception:  # a file this code reads otherwise than tokenizers: let it judge
        del vocab, merges
        return tokenizers.Tokenizer.from_file(str(path))
    del vocab, merges
    # everything but the vocabulary, the merges and the added tokens, read by tokenizers
    model["vocab"], model["merges"], spec["added_tokens"] = {}, [], []
    backend.__setstate__(json.dumps(spec).encode())  # as unpickling does
    backend.model = bpe
    backend.add_tokens(added)
    return backend


@cache
def _first_use() -> None:
    """Make, once per process, what `read_backend` would otherwise leave in memory for
    good in the middle of its parse: UTF-8 copies of the one-character strings (Python
    shares them for the life of the process, and PyO3 reads each as UTF-8, which Python
    caches on the string) and the objects the JSON encoder makes on its first use.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    Tokenizer(BPE({chr(i): i for i in range(256)}, []))
    json.dumps({"a": {"b": [None, True, 1.5, "c"]}})


def _added_token(entry: dict[str, Any]) -> Any:
    """A `tokenizers.AddedToken` from its `tokenizer.json` entry (the id is the vocabulary's)."""
    import tokenizers

    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return tokenizers.AddedToken(entry["content"], **{f: entry[f] for f in flags if f in entry})


@cache
def _reader_class() -> Any:
    """A `TokenizersBackend` whose `from_pretrained` builds the Rust tokenizer with
    `read_backend`; the instance it makes is a plain `TokenizersBackend` (it saves, pickles
    and prints as one).
    """
    from transformers import TokenizersBackend

    class _PythonBuiltBackend(TokenizersBackend):
        @classmethod
        def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> Any:
            path = kwargs.pop("tokenizer_file", None)
            if path is None:
                raise FileNotFoundError("the folder has no tokenizer.json")
            kwargs["_deepen_backend"] = read_backend(path)
            return kwargs

        def __init__(self, *args: Any, _deepen_backend: Any = None, **kwargs: Any) -> None:
            # transformers' own classes set `_tokenizer` before this `__init__` in the same way
            self._tokenizer = _deepen_backend
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
            self.__class__ = TokenizersBackend  # type: ignore[assignment]

    return _PythonBuiltBackend
