"""What every fusion method shares: the `Fuser` interface the decoding loop calls, the
per-step gate, and the registry that picks a method's class from `FusionConfig.method`.

`Fuser.fuse`, for a batch of rows:

1. The main member alone when fusion is the identity (one member, or all the weight on the
   main member, or a method's own identity settings such as DeePEn's `eta=0`).
2. The gate (`FusionConfig.gate`) marks rows whose fusion is skipped this step: `"agree"`
   when every member's most probable token has the same text (an anchor) or every member's
   most probable token ends the text; `"confident"` when the main member's top probability
   reaches `gate_threshold` (GaC's thresholded ensemble). Skipped rows keep the main
   member's logits.
3. The other rows go through the method's `_fuse_rows`: fused (B', V_main) logits, with
   each row's member weights from `row_weights` (`FusionConfig.weighting`).

A method is a subclass registered with `@register("name")` that implements `from_context`
(build from the ensemble's shared `FusionContext`) and `_fuse_rows`; `FusionConfig.method`
names it (docs/design.md: "where to add a fusion method").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from ..alignment.vocabulary import Anchors
from ..config import FusionConfig
from ..devices import DeviceCopies, resolve_device
from ..reductions import argmax

if TYPE_CHECKING:
    from ..members import Member
    from .context import FusionContext

_METHODS: dict[str, type[Fuser]] = {}
_F = TypeVar("_F", bound="type[Fuser]")


def register(name: str) -> Callable[[_F], _F]:
    """Class decorator: the fusion method `FusionConfig.method == name`."""

    def add(cls: _F) -> _F:
        cls.method = name
        _METHODS[name] = cls
        return cls

    return add


@dataclass
class FuseStats:
    """What a fuser did so far (read by the bench and the eval)."""

    rows: int = 0
    """Row-steps that asked for fusion (identity fusers count none)."""
    gated: int = 0
    """Of those, row-steps the gate answered with the main member's logits."""
    seconds: float = 0.0
    """Time spent in `fuse` (gate included)."""


class Fuser:
    """Fused next-token logits in the main member's vocabulary, batched over rows.

    Subclasses are the methods (`DeepenFuser`, `UnionFuser`, `UniteFuser`). Build one with
    `Fuser.build(members, anchors, config)`; `with_config` gives the same members with
    other settings (and possibly another method), sharing what was computed.
    """

    method: ClassVar[str] = ""

    def __init__(
        self,
        anchors: Anchors,
        end_ids: Sequence[frozenset[int]],  # per member: its end-of-text token ids
        config: FusionConfig,
    ) -> None:
        self.anchors = anchors
        self.config = config
        self.main = config.leader  # "auto" configs are turned into one fuser per leader
        self.end_ids = [torch.tensor(sorted(e), dtype=torch.long) for e in end_ids]
        # one weight per member (a single member has no anchors, but a weight of 1)
        self.weights = torch.tensor(config.normalised_weights(len(end_ids)))
        self.main_eos_ids = self.end_ids[self.main]
        self.context: FusionContext | None = None  # set by build: what with_config reuses
        self.stats = FuseStats()
        self._given: torch.Tensor | None = None  # (B, N) row weights of the current `fuse`
        # the tables above on other devices (shared with the context's fusers by `_make`)
        self.copies = DeviceCopies()
        self._fusion_device = (
            resolve_device(config.fusion_device) if config.fusion_device is not None else None
        )

    # --- construction -----------------------------------------------------------------

    @classmethod
    def build(
        cls, members: Sequence[Member], anchors: Anchors | None, config: FusionConfig
    ) -> Fuser:
        """The fuser of `config.method` for loaded members (`anchors` is None for one)."""
        from .context import FusionContext

        return _make(FusionContext(members, anchors), config)

    @classmethod
    def from_context(cls, context: FusionContext, config: FusionConfig) -> Fuser:
        """The method's fuser over the ensemble's shared context (subclasses implement it)."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_context")

    def with_config(self, config: FusionConfig) -> Fuser:
        """The same members with other settings; what does not depend on the changed
        settings (relative spaces and their row caches, token maps) is shared.
        """
        if self.context is None:
            raise RuntimeError("with_config needs a fuser made by Fuser.build")
        return _make(self.context, config)

    def reserve_rows(self) -> int:
        """Allocate the method's per-token caches in full now; their bytes (none here:
        DeePEn's relative-row caches are the only ones, `DeepenFuser.reserve_rows`).
        """
        return 0

    @property
    def members(self) -> list[Member]:
        """The loaded members (empty for a fuser built by hand)."""
        return list(self.context.members) if self.context is not None else []

    # --- fusing -----------------------------------------------------------------------

    @property
    def is_identity(self) -> bool:
        """Whether fusion returns the main member's logits unchanged."""
        return len(self.end_ids) == 1 or float(self.weights[self.main]) == 1.0

    def fusion_device(self, logits: Sequence[torch.Tensor]) -> torch.device:
        """Where the fused logits are made: `FusionConfig.fusion_device`, else the device of
        the main member's logits.
        """
        if self._fusion_device is not None:
            return self._fusion_device
        return logits[self.main].device

    def on(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """One of the fuser's constant tables on `device` (itself when it is there)."""
        return self.copies.on(table, device)

    def fuse(
        self, logits: Sequence[torch.Tensor], weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fused logits in the main member's vocabulary, on the fusion device.

        logits: per member (B, V_i) next-token logits, each on its member's device.
        weights: (B, N) each row's member weights (`weighting="prompt"`: the loop computes
        them from the rows' prompt scores); None: the fixed weights.
        Returns (B, V_main) float32.
        """
        self._given = weights
        try:
            return self._fuse_gated(logits)
        finally:
            self._given = None

    def _fuse_gated(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fuse` once the call's row weights are set: the gate, then the method."""
        device = self.fusion_device(logits)
        main_logits = logits[self.main].float().to(device)  # (B, V)
        if self.is_identity:
            return main_logits
        start = time.perf_counter()
        skip = self.gate_mask(logits)  # (B,) bool, on the fusion device
        self.stats.rows += int(skip.numel())
        self.stats.gated += int(skip.sum())
        if self.context is not None:
            self.context.fusion_rows += int(skip.numel())
            self.context.gated_rows += int(skip.sum())
        if bool(skip.all()):
            fused = main_logits
        elif not bool(skip.any()):
            fused = self._fuse_rows(logits)
        else:
            keep = (~skip).nonzero().squeeze(1)
            if self._given is not None:  # the kept rows' own weights
                self._given = self._given[keep.to(self._given.device)]
            fused = main_logits.clone()
            fused[keep] = self._fuse_rows([x[keep.to(x.device)] for x in logits])
        if fused.device.type == "cuda":
            # count the kernels, not their launch (sampling waits for them right after)
            torch.cuda.synchronize(fused.device)
        spent = time.perf_counter() - start
        self.stats.seconds += spent
        if self.context is not None:
            self.context.fusion_seconds += spent
        return fused

    def gate_mask(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B,) bool on the fusion device: rows whose fusion the gate skips this step."""
        cfg = self.config
        batch = logits[self.main].shape[0]
        device = self.fusion_device(logits)
        if cfg.gate == "off":
            return torch.zeros(batch, dtype=torch.bool, device=device)
        if cfg.gate == "confident":
            main = logits[self.main].float()
            top = (main.max(-1).values - main.logsumexp(-1)).exp()  # (B,) top probability
            return (top >= cfg.gate_threshold).to(device)
        # "agree": every member's top token is the same anchor, or every one ends the text.
        # Each member's top token, anchor and end test on its own device; (B,) crosses.
        anchor, ends = [], []
        for i, x in enumerate(logits):
            top_id = argmax(x)  # (B,)
            to_anchor = self.on(self.anchors.token_to_anchor[i], top_id.device)
            anchor.append(to_anchor[top_id].to(device))
            ends.append(torch.isin(top_id, self.on(self.end_ids[i], top_id.device)).to(device))
        same = (anchor[0] >= 0) & torch.stack([a == anchor[0] for a in anchor]).all(0)
        return same | torch.stack(ends).all(0)

    def row_weights(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, N) member weights of each row on the fusion device, summing to 1: the fixed
        weights, or with `weighting="confidence"` each times the member's top probability,
        renormalised.
        """
        batch = logits[self.main].shape[0]
        device = self.fusion_device(logits)
        if self.config.weighting == "prompt":
            if self._given is None:
                raise RuntimeError(
                    "weighting='prompt' needs each row's prompt scores; fuse through the "
                    "decoding loop (Ensemble.generate), which scores the prompts."
                )
            return self._given.to(device)
        fixed = self.on(self.weights, device)[None, :].expand(batch, -1)  # (B, N)
        if self.config.weighting == "fixed":
            return fixed
        top = torch.stack(
            [(x.float().max(-1).values - x.float().logsumexp(-1)).exp().to(device) for x in logits],
            -1,
        )  # (B, N) each member's top probability
        scaled = fixed * top
        return scaled / scaled.sum(-1, keepdim=True).clamp(min=1e-30)

    def _fuse_rows(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The method's fused (B, V_main) logits for rows the gate let through."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _fuse_rows")


def _make(context: FusionContext, config: FusionConfig) -> Fuser:
    """The registered method's fuser, remembering the context it was made from."""
    cls = _METHODS.get(config.method)
    if cls is None:  # FusionConfig checks the name; a method module not imported lands here
        raise RuntimeError(
            f"fusion method {config.method!r} is not registered (known: {sorted(_METHODS)})"
        )
    fuser = cls.from_context(context, config)
    fuser.context = context
    fuser.copies = context.copies  # one copy of a shared table per device, for all fusers
    return fuser


def outside_union(main_logits: torch.Tensor) -> torch.Tensor:
    """Logits for main-member tokens outside a union method's candidates: the main member's
    log-probability minus 10,000. Never chosen while a candidate is allowed, and ordered as
    the main member orders them if every candidate is masked (e.g. `min_new_tokens` masking
    the only candidate, an end token). (B, V) float32.
    """
    return main_logits.float().log_softmax(-1) - 1e4
