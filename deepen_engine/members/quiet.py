"""Loading without other libraries' progress bars: deepen shows one bar per long step
(converting a GGUF file), so transformers' "Loading weights", "Writing model shards" and
GGUF de-quantisation bars, and the hub's download bars, are hidden while a member loads.

`DEEPEN_VERBOSE=1` in the environment (the command line's `--verbose`) shows them again.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any


def verbose() -> bool:
    """Whether `DEEPEN_VERBOSE` asks for the libraries' own output."""
    return os.environ.get("DEEPEN_VERBOSE", "").lower() not in ("", "0", "false", "no")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' and huggingface_hub's progress bars inside the block (restored
    after it), unless `verbose()`.
    """
    if verbose():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as transformers_logging

    logging: Any = transformers_logging  # untyped upstream
    # the module, not the `tqdm` class `huggingface_hub.utils` exports under that name
    hub_tqdm: Any = importlib.import_module("huggingface_hub.utils.tqdm")
    bars_on = logging.is_progress_bar_enabled()
    hub_bars_off = hub_tqdm.are_progress_bars_disabled()
    # The GGUF loader uses tqdm directly, not transformers' switchable one.
    gguf_tqdm: Any = getattr(gguf_utils, "tqdm", None)
    logging.disable_progress_bar()
    hub_tqdm.disable_progress_bars()
    if gguf_tqdm is not None:
        setattr(gguf_utils, "tqdm", partial(gguf_tqdm, disable=True))  # noqa: B010
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            setattr(gguf_utils, "tqdm", gguf_tqdm)  # noqa: B010
        if not hub_bars_off:
            hub_tqdm.enable_progress_bars()
        if bars_on:
            logging.enable_progress_bar()
