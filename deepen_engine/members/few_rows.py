"""Linear layers over a few rows, on the CPU, computed the faster way round.

`torch.nn.functional.linear(x, w)` is `x @ w.T`. For a few rows of `x` (2 to a few dozen:
a batch of next tokens, the positions of a speculative verification) the CPU build's
matrix product ran that layout far below the memory bandwidth on the machine measured
here (MKL on an AMD EPYC; `scripts/output_layer.py`): Gemma-3's 262k-row output layer over
4 rows took 230 ms as `x @ w.T` and 50 ms as `(w @ x.T).T`, a 2048 x 640 layer 0.9 ms
against 0.4 ms. Both are the same product, summed in another order (float rounding).

`few_row_products()` reroutes every `linear` call of 2 to `FEW_ROWS` rows with float32 CPU
tensors to the second form for the duration of a block (a `TorchFunctionMode`: the
model's modules are left as they are, and the mode is per thread); every other call runs
unchanged. The decoding loop wraps each member forward in it (decoding/member_forward.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

FEW_ROWS = 64
"""Most rows rerouted: beyond, `linear` is as fast and the transposed result would cost
another copy of the output."""


def _few(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `hidden @ weight.T` is one the faster form serves: 2 to `FEW_ROWS` rows,
    float32, on the CPU.
    """
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    cpu = hidden.device.type == weight.device.type == "cpu"
    return cpu and hidden.dtype == weight.dtype == torch.float32 and 1 < rows <= FEW_ROWS


def product(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, V) `hidden @ weight.T` of (N, d) rows, the faster way round where `_few`
    (module docstring).
    """
    if _few(hidden, weight):
        return _transposed(hidden, weight)
    return torch.nn.functional.linear(hidden, weight)


def _transposed(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mm(weight, hidden.T).T.contiguous()


def _rerouted(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """`linear(x, w, b)` in the faster form, or None where the call is left alone."""
    x = args[0] if args else kwargs.get("input")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None  # a tensor subclass (quantized, offloaded): its own rules apply
    if weight.dim() != 2 or x.requires_grad or not _few(x, weight):
        return None  # float32 only: bfloat16 products take other kernels, not measured
    out = _transposed(x.reshape(-1, x.shape[-1]), weight)  # checked above: no second _few
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class _FewRows(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            out = _rerouted(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


def few_row_products() -> TorchFunctionMode:
    """A context manager rerouting few-row `linear` calls (module docstring)."""
    return _FewRows()
