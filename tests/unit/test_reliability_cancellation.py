"""Reliability, cancellation: 50 cycles of starting a stream, reading a chunk or two and
then cancelling the task or closing the stream (engine `astream` and `stream`, LangChain
`astream`) leave the engine usable: every member cache made is freed, the ensemble is
released, the row caches stay within their bound, resident memory does not grow, and the
next request gives exactly the text it gave before."""

from __future__ import annotations

import asyncio
import gc

import pytest

from deepen_engine.commands.bench.timing import rss_mb
from deepen_engine.decoding import member_batch as sync
from tests.conftest import IDLE

PROMPT = "Once upon a time there was a small model that learned to write stories. It"
CYCLES = 50
LONG = 200  # far more tokens than a cycle ever reads


@pytest.fixture
def batches(monkeypatch):
    """Counts MemberBatch objects made during the test, and those of them freed (each
    counted once; the scheduler's long-lived batches, made before, do not count)."""
    counts = {"made": 0, "freed": 0}
    init, free = sync.MemberBatch.__init__, sync.MemberBatch.free

    def recording_init(self, *args, **kwargs):
        counts["made"] += 1
        self._made_in_test = True
        init(self, *args, **kwargs)

    def recording_free(self):
        if getattr(self, "_made_in_test", False) and not getattr(self, "_counted_free", False):
            self._counted_free = True
            counts["freed"] += 1
        free(self)

    monkeypatch.setattr(sync.MemberBatch, "__init__", recording_init)
    monkeypatch.setattr(sync.MemberBatch, "free", recording_free)
    return counts


async def _cancel_after(stream, chunks: int) -> None:
    """Read `chunks` items of an async stream in a task, then cancel the task."""
    got = asyncio.Event()

    async def consume():
        seen = 0
        async for _ in stream:
            seen += 1
            if seen >= chunks:
                got.set()

    task = asyncio.create_task(consume())
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _close_after(stream, chunks: int) -> None:
    """Read `chunks` items of an async generator, then close it."""
    for _ in range(chunks):
        await stream.__anext__()
    await stream.aclose()


def _cycles(ens, llm, n: int) -> None:
    """n cancel/close cycles, alternating the ways a reader can walk away."""

    async def main():
        for i in range(n):
            kind = i % 4
            if kind == 0:
                await _cancel_after(ens.astream(PROMPT, max_new_tokens=LONG), 1)
            elif kind == 1:
                await _close_after(ens.astream([PROMPT, "Q:"], max_new_tokens=LONG), 2)
            elif kind == 2:
                await _cancel_after(llm.astream(PROMPT), 2)
            else:
                await _close_after(llm.astream(PROMPT), 1)
            # a synchronous stream closed mid-generation, between the async ones
            stream = ens.stream(PROMPT, max_new_tokens=LONG)
            next(stream)
            stream.close()

    # asyncio.run waits for the executor's workers: every abandoned stream has ended
    asyncio.run(main())


def test_50_cancel_cycles_leave_the_engine_usable_without_growth(tiny_ensemble, batches):
    pytest.importorskip("langchain_core")
    from deepen_integrations.langchain import DeepEnLLM

    ens = tiny_ensemble
    llm = DeepEnLLM(ensemble=ens, max_tokens=LONG)
    before = ens.generate(PROMPT, max_new_tokens=12)
    _cycles(ens, llm, 4)  # warm-up: allocator pools, thread pool, relative rows
    gc.collect()
    rss_before = rss_mb()
    made_before = batches["made"]

    _cycles(ens, llm, CYCLES)

    gc.collect()
    growth = rss_mb() - rss_before
    assert batches["made"] - made_before >= CYCLES  # every cycle really started decoding
    assert batches["made"] == batches["freed"]  # and freed every member's cache
    assert ens.queue_state() == IDLE
    for space in ens.fuser.spaces:
        assert len(space._cache) <= ens.fusion.row_cache_size
    assert growth < 50, f"resident memory grew {growth:.1f} MB over {CYCLES} cancel cycles"
    after = ens.generate(PROMPT, max_new_tokens=12)
    assert (after.text, after.token_ids) == (before.text, before.token_ids)


def test_a_stream_cancelled_while_waiting_for_the_ensemble_never_runs(tiny_ensemble, batches):
    """A request cancelled while another holds the ensemble must not decode afterwards."""
    ens = tiny_ensemble

    async def main():
        holder = ens.stream(PROMPT, max_new_tokens=LONG)
        next(holder)  # this thread holds the ensemble now
        made = batches["made"]
        waiting = asyncio.create_task(_drain(ens.astream(PROMPT, max_new_tokens=LONG)))
        await asyncio.sleep(0)  # let it start and queue behind the holder
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        holder.close()
        return made

    async def _drain(stream):
        async for _ in stream:
            pass

    made = asyncio.run(main())
    assert batches["made"] == made  # the cancelled request made no cache at all
    assert batches["made"] == batches["freed"]
    assert ens.generate("Q:", max_new_tokens=4).finish_reason in {"length", "eos"}
