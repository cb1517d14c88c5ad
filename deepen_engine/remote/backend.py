"""Members in Ray actors: one actor per member (remote/actor.py) loads the model on
the node Ray places it and runs its forward passes; this process (the coordinator) keeps
the tokenizer, the canonical vocabulary and the input embeddings (fusion reads them), and
its batches (remote/batch.py) reach the actor through a `RayLink`.

`RayMembers(specs)` joins the cluster and checks its resources (cluster.py) before
any model loads, then starts every actor at once, so members load in parallel;
`wait()` gives their `Member`s. Ray is imported only when a member asks for it.

Faults: a step that gets no answer within `MemberSpec.step_timeout` or whose actor died
raises `MemberError` naming the member, never hangs; a stuck actor is killed so that Ray
restarts it (`max_restarts`), and the next step first waits (up to `load_timeout`) for
the restarted actor, which has loaded its model again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from ..errors import MemberError, MemberLoadError
from ..members.member import Member, MemberSpec, display_name
from .actor import MemberActor, MemberInfo
from .batch import LinkStats
from .cluster import check_resources, cluster_address, connect, demand
from .protocol import Open, StepReply, StepRequest

_LOCAL_FIELDS = (
    "source",
    "name",
    "device",
    "dtype",
    "chat_template",
    # how the weights load, applied inside the actor (members/placement.py)
    "device_map",
    "max_memory",
    "offload_folder",
    "quantization",
    "quantization_config",
    "model_kwargs",
)
_EMBEDDING_CHUNK_BYTES = 64 * 2**20  # input embeddings come over in pieces this large
_RESTART_POLL_SECONDS = 0.5  # how often to ask whether a restarting actor is back
_RELEASE_WAIT = 5.0  # seconds close() waits for a killed actor's resources to show free
_actor_class: Any = None  # ray.remote(MemberActor), made on first use


class RemoteModel:
    """What the coordinator holds of a model that runs in an actor: its config (context
    and sliding windows) and its input embeddings (the relative space reads them). It has
    no forward pass: the actor runs the model.
    """

    def __init__(self, config: Any, embeddings: torch.Tensor) -> None:
        self.config = config
        self._embeddings = _Embeddings(embeddings)

    def get_input_embeddings(self) -> _Embeddings:
        """The input embeddings: `.weight` is the (V, d) matrix, as the model has it."""
        return self._embeddings


class _Embeddings:
    """A model's input embedding matrix, where transformers keeps it (`.weight`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


class RayLink:
    """The coordinator's line to one member's actor (`remote.batch.MemberLink`)."""

    def __init__(self, ray: ModuleType, actor: Any, spec: MemberSpec, name: str) -> None:
        self.ray = ray
        self.actor = actor
        self.name = name
        self.step_timeout = spec.step_timeout
        self.load_timeout = spec.load_timeout
        self.max_restarts = spec.max_restarts
        self.demand = demand(spec)
        self.stats = LinkStats()
        self.info: MemberInfo | None = None
        self.num_parameters = 0
        self._lost = False  # the actor failed: wait for its restart before the next step
        self._hung = False  # the last call timed out (not worth sending again)

    def step(self, request: StepRequest) -> StepReply:
        """One step in the actor; `MemberError` naming the member if it died or hung.

        A request that carries all its batch's state (the prefill of new rows: it opens
        the batch it runs) is sent again, once, to an actor that died before answering:
        a restarted actor can run it, so an actor that died between requests costs none.
        """
        if self._lost:
            self._wait_back()
        try:
            return self._call(request)
        except MemberError:
            first = request.ops[0] if request.ops else None
            if not (isinstance(first, Open) and first.batch == request.forward) or self._hung:
                raise
            self._wait_back()
            return self._call(request)

    def _call(self, request: StepRequest) -> StepReply:
        exceptions = self.ray.exceptions
        self._hung = False
        try:
            reply: StepReply = self.ray.get(
                self.actor.step.remote(request), timeout=self.step_timeout
            )
            return reply
        except exceptions.GetTimeoutError:
            self._lost = self._hung = True
            self.ray.kill(self.actor, no_restart=False)  # a stuck actor: Ray starts a new one
            raise MemberError(
                self.name,
                f"Member {self.name!r} did not answer within step_timeout="
                f"{self.step_timeout:g} s (its Ray actor is stuck or far too slow); the "
                "request was abandoned and the actor restarted. Raise MemberSpec.step_timeout "
                "if its steps really take that long.",
            ) from None
        except exceptions.RayError as exc:
            self._lost = True
            raise MemberError(
                self.name,
                f"Member {self.name!r}: its Ray actor died during the request "
                f"({type(exc).__name__}); the request was abandoned, and Ray restarts the "
                f"actor (max_restarts={self.max_restarts}) for the next one.",
            ) from exc

    def _wait_back(self) -> None:
        """Wait for the restarted actor (it loads its model again); while Ray restarts
        it, calls fail at once as unavailable, so ask again until `load_timeout`.
        """
        exceptions = self.ray.exceptions
        restarting = getattr(exceptions, "ActorUnavailableError", None)
        deadline = time.monotonic() + self.load_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                self.ray.get(self.actor.pid.remote(), timeout=max(left, 0.1))
                break
            except (exceptions.GetTimeoutError, exceptions.RayError) as exc:
                if restarting and isinstance(exc, restarting) and left > 0:
                    time.sleep(_RESTART_POLL_SECONDS)
                    continue
                raise MemberError(
                    self.name,
                    f"Member {self.name!r}: its Ray actor did not come back within "
                    f"load_timeout={self.load_timeout:g} s after it failed "
                    f"({type(exc).__name__}: {exc}). Ray restarts it at most "
                    f"max_restarts={self.max_restarts} times; make a new Ensemble to start it "
                    "afresh.",
                ) from None
        self._lost = False

    def free(self, batch: int) -> None:
        """Drop a batch in the actor without waiting; a dead actor has nothing to drop."""
        try:
            self.actor.free.remote(batch)
        except Exception:  # noqa: S110 - the actor is gone, and its batches with it
            pass

    def cpu_seconds(self) -> float:
        """CPU time the actor's process has used so far."""
        seconds: float = self.ray.get(self.actor.cpu_seconds.remote(), timeout=self.step_timeout)
        return seconds

    def close(self) -> None:
        """Stop the actor for good, and wait (at most `_RELEASE_WAIT` s) until the cluster
        shows its resources free again: Ray releases them a moment after the kill, and a
        new ensemble's resource check right after `close()` would otherwise see them held.
        """
        try:
            before = self.ray.available_resources()
            self.ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: S110 - already gone, or Ray shut down
            return
        deadline = time.monotonic() + _RELEASE_WAIT
        need = self.demand.items()
        while time.monotonic() < deadline:
            free = self.ray.available_resources()
            if all(free.get(k, 0.0) + 1e-9 >= before.get(k, 0.0) + v for k, v in need):
                return
            time.sleep(0.05)


class RayMembers:
    """Actors started for some members (see the module docstring)."""

    def __init__(self, specs: Sequence[MemberSpec]) -> None:
        ray = connect(cluster_address(specs))
        check_resources(ray, specs)
        self.ray = ray
        self.specs = list(specs)
        self.start = time.perf_counter()
        self.links = [RayLink(ray, self._start_actor(s), s, display_name(s)) for s in specs]

    def _start_actor(self, spec: MemberSpec) -> Any:
        global _actor_class
        if _actor_class is None:
            _actor_class = self.ray.remote(MemberActor)
        # the fields the user gave (device and device_map exclude each other)
        local = {k: getattr(spec, k) for k in _LOCAL_FIELDS if k in spec.model_fields_set}
        local["source"] = str(spec.source)
        return _actor_class.options(
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
            resources=dict(spec.resources) or None,
            max_restarts=spec.max_restarts,
            max_task_retries=0,  # a step must not run twice: it edits the cache
        ).remote(local, max(1, int(spec.num_cpus)))

    def wait(self) -> list[Member]:
        """The members, once every actor has loaded its model; `MemberLoadError` naming
        the member that could not load (or did not within its `load_timeout`).
        """
        return [self._member(spec, link) for spec, link in zip(self.specs, self.links)]

    def _member(self, spec: MemberSpec, link: RayLink) -> Member:
        info = self._describe(spec, link)
        link.info, link.name, link.num_parameters = info, info.name, info.num_parameters
        model = RemoteModel(info.config, self._embeddings(link, info, spec))
        return Member(
            name=info.name,
            model=model,
            tokenizer=info.tokenizer,
            vocab=info.vocab,
            device=torch.device(info.device),
            dtype=getattr(torch, info.dtype),
            source_kind=info.source_kind,
            load_seconds=time.perf_counter() - self.start,
            eos_ids=info.eos_ids,
            cache_argument=info.cache_argument,
            chat_template=spec.chat_template,
            remote=link,
        )

    def _describe(self, spec: MemberSpec, link: RayLink) -> MemberInfo:
        exceptions = self.ray.exceptions
        try:
            info = self.ray.get(link.actor.describe.remote(), timeout=spec.load_timeout)
        except exceptions.GetTimeoutError:
            raise MemberLoadError(
                f"Member {link.name!r}: its Ray actor did not load the model within "
                f"load_timeout={spec.load_timeout:g} s (a first GGUF conversion takes "
                "minutes); raise MemberSpec.load_timeout."
            ) from None
        except exceptions.RayError as exc:
            raise MemberLoadError(
                f"Member {link.name!r}: its Ray actor died while loading ({exc})."
            ) from None
        if isinstance(info, str):
            raise MemberLoadError(
                f"Member {link.name!r} could not be loaded in its Ray actor: {info}"
            )
        return info

    def _embeddings(self, link: RayLink, info: MemberInfo, spec: MemberSpec) -> torch.Tensor:
        """The input embedding matrix, fetched in chunks (a large object would need an
        object store that large).
        """
        first = self.ray.get(link.actor.embeddings.remote(0, 1), timeout=spec.load_timeout)
        step = max(1, _EMBEDDING_CHUNK_BYTES // max(1, first.element_size() * first.shape[1]))
        chunks = []
        for start in range(0, info.embedding_rows, step):  # one at a time: a bounded store
            ref = link.actor.embeddings.remote(start, min(start + step, info.embedding_rows))
            chunks.append(self.ray.get(ref, timeout=spec.load_timeout))
        return torch.cat(chunks)

    def close(self) -> None:
        """Stop every actor (construction failed)."""
        for link in self.links:
            link.close()
