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


def product(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, V) `hidden @ weight.T` of (N, d) rows, the faster way round for 2 to `FEW_ROWS`
    rows on the CPU (module docstring).
    """
    cpu = hidden.device.type == "cpu" and hidden.dtype == weight.dtype == torch.float32
    if cpu and 1 < hidden.shape[0] <= FEW_ROWS:
        return torch.mm(weight, hidden.T).T.contiguous()
    return torch.nn.functional.linear(hidden, weight)


def _rerouted(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """`linear(x, w, b)` in the faster form, or None where the call is left alone."""
    x = args[0] if args else kwargs.get("input")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None  # a tensor subclass (quantized, offloaded): its own rules apply
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.requires_grad:
        return None  # measured in float32 only (bfloat16 products take other kernels)
    rows = x.numel() // max(x.shape[-1], 1)
    if not 1 < rows <= FEW_ROWS:
        return None
    out = torch.mm(weight, x.reshape(rows, x.shape[-1]).T).T.contiguous()
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
