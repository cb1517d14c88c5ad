"""The member's side of a Ray actor: it loads the model where Ray placed it, holds the
member's batches (ordinary `MemberBatch`es: ids, KV cache) and runs the steps the
coordinator sends (remote/protocol.py).

A plain class, so the unit tests drive it in process; remote/backend.py makes it a
Ray actor. Its constructor is what Ray reruns when it restarts a dead actor, so a
restarted actor loads the same model again.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..alignment.vocabulary import CanonicalVocab
from ..decoding.member_batch import MemberBatch
from ..errors import MemberError
from ..members.loading import load_local_member
from ..members.member import Member, MemberSpec
from .protocol import (
    EditIds,
    Free,
    KeepRows,
    Merge,
    Op,
    Open,
    StepReply,
    StepRequest,
    TakeRows,
)


@dataclass
class MemberInfo:
    """What the coordinator needs of a member loaded in an actor: everything but the
    weights (the input embeddings come apart, in chunks: `MemberActor.embeddings`).
    """

    name: str
    tokenizer: Any
    vocab: CanonicalVocab
    config: Any  # the model's transformers config
    dtype: str  # e.g. "float32"
    device: str  # the model's device in the actor
    source_kind: str
    load_seconds: float
    eos_ids: frozenset[int]
    cache_argument: str
    num_parameters: int
    embedding_rows: int
    torch_threads: int
    code: str  # where the actor imported deepen_engine from
    pid: int
    node: str  # host name of the actor's node


class MemberActor:
    """One member in its own process: its model, its batches, its steps."""

    def __init__(self, spec: dict[str, Any], threads: int) -> None:
        """Load the member of `spec` (MemberSpec fields of a local member) with `threads`
        torch threads. A failure is kept for `describe` to report, not raised: an actor
        whose constructor raises dies without a usable message.
        """
        torch.set_num_threads(threads)
        self.batches: dict[int, MemberBatch] = {}
        self.member: Member | None = None
        self.error: str | None = None
        try:
            self.member = load_local_member(MemberSpec(**spec))
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    @classmethod
    def holding(cls, member: Member) -> MemberActor:
        """An actor around a member loaded already (the unit tests drive the protocol in
        process with it).
        """
        actor = cls.__new__(cls)
        actor.batches, actor.member, actor.error = {}, member, None
        return actor

    def _loaded(self) -> Member:
        if self.member is None:
            raise RuntimeError(f"the model did not load in this actor ({self.error})")
        return self.member

    def describe(self) -> MemberInfo | str:
        """The loaded member's `MemberInfo`, or why it did not load."""
        if self.member is None:
            return self.error or "the model did not load"
        m = self.member
        return MemberInfo(
            name=m.name,
            tokenizer=m.tokenizer,
            vocab=m.vocab,
            config=m.model.config,
            dtype=str(m.dtype).removeprefix("torch."),
            device=str(m.device),
            source_kind=m.source_kind,
            load_seconds=m.load_seconds,
            eos_ids=m.eos_ids,
            cache_argument=m.cache_argument,
            num_parameters=m.num_parameters,
            embedding_rows=int(m.model.get_input_embeddings().weight.shape[0]),
            torch_threads=torch.get_num_threads(),
            code=str(Path(__file__).resolve().parents[1]),
            pid=os.getpid(),
            node=socket.gethostname(),
        )

    def embeddings(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of the input embedding matrix, (n, d), in the model's dtype."""
        weight = self._loaded().input_embedding_weight()
        return weight.detach()[start:stop].cpu().clone()

    def step(self, request: StepRequest) -> StepReply:
        """Apply the request's operations, feed its batch, answer what fusion reads (and
        the rows' prompt scores, for a batch that scores them).

        A failure comes back as `StepReply.error` (the coordinator raises `MemberError`
        naming the member); the batch is abandoned by the coordinator then.
        """
        try:
            member = self._loaded()
            for op in request.ops:
                self._apply(member, op)
            batch = self._batch(request.forward)
            before = batch.forward_seconds
            batch.forward()
            fed = [r.fed_positions for r in batch.rows]
            spent = batch.forward_seconds - before
            reply = StepReply.of_logits(batch.logits, request.top_k, fed, spent)
            if batch.score_prompts:  # the rows' prompt scores, as the coordinator keeps them
                reply.scores = [(r.score.nll, r.score.bytes, r.score.tokens) for r in batch.rows]
            return reply
        except MemberError as exc:  # the forward pass raised: report the model's error
            cause = exc.__cause__ or exc
            return StepReply(error=f"{type(cause).__name__}: {cause}")
        except Exception as exc:
            return StepReply(error=f"{type(exc).__name__}: {exc}")

    def _apply(self, member: Member, op: Op) -> None:
        """One batch operation (protocol.py)."""
        if isinstance(op, Open):
            batch = MemberBatch(member, op.prompt_ids)
            if op.spans is not None:  # its prefill scores the prompts
                batch.score_prompts = True
                for row, span in zip(batch.rows, op.spans):
                    row.score.span = span
            self.batches[op.batch] = batch
        elif isinstance(op, EditIds):
            self._batch(op.batch).replace_ids(op.row, op.keep, op.tail)
        elif isinstance(op, KeepRows):
            self._batch(op.batch).keep_rows(op.rows)
        elif isinstance(op, Merge):
            self._batch(op.batch).merge(self._batch(op.other))
            del self.batches[op.other]
        elif isinstance(op, TakeRows):
            source = self._batch(op.batch)
            for b, new in zip(op.rows, op.into):
                self.batches[new] = source.take_row(b)
        elif isinstance(op, Free):
            self.free(op.batch)

    def _batch(self, batch: int) -> MemberBatch:
        """A batch held here; a restarted actor holds none of its predecessor's."""
        if batch not in self.batches:
            raise LookupError(
                f"batch {batch} is not held here: the actor was restarted during the request "
                "and lost its KV cache"
            )
        return self.batches[batch]

    def free(self, batch: int) -> None:
        """Drop a batch (nothing happens for one this actor does not hold)."""
        gone = self.batches.pop(batch, None)
        if gone is not None:
            gone.free()

    def held_rows(self) -> dict[int, int]:
        """Rows each batch held here holds (what a test checks after a request is gone)."""
        return {b: len(batch.rows) for b, batch in self.batches.items()}

    def cpu_seconds(self) -> float:
        """CPU time this actor's process has used (all threads): the bench compares it
        with the wall time to see what share of a core the actor got.
        """
        return time.process_time()

    def pid(self) -> int:
        """The actor's process id (a cheap call: is it up?)."""
        return os.getpid()
