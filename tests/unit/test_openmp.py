"""The calling thread's OpenMP pool is freed (deepen_engine/openmp.py), and the scheduler
frees its own when it goes idle, so the thread that decodes holds the only pool."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from deepen_engine import Ensemble, MemberSpec
from deepen_engine.openmp import release_thread_pool
from tests.conftest import PLAIN

needs_pools = pytest.mark.skipif(
    not release_thread_pool() or (os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"),
    reason="needs torch on libgomp and 2+ CPUs (Linux)",
)


@pytest.fixture(autouse=True)
def _two_torch_threads():
    """Pools need workers: two intra-op threads here (the unit tier runs one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _gone(tids: set[int], timeout: float = 5.0) -> bool:
    """Whether every thread in `tids` has exited (polled: exits are not instant)."""
    end = time.monotonic() + timeout
    while tids & _tasks():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _parallel_op() -> None:
    torch.ones(2**22).exp_()  # well above torch's grain size: a parallel region


@needs_pools
def test_release_frees_the_calling_threads_workers():
    seen: dict[str, set[int]] = {}

    def work() -> None:
        before = _tasks()
        _parallel_op()
        seen["workers"] = _tasks() - before - {threading.get_native_id()}
        release_thread_pool()
        seen["released"] = set(seen["workers"])
        _parallel_op()  # works again: a new pool
        release_thread_pool()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen["workers"], "the parallel region started no OpenMP worker"
    assert _gone(seen["released"])


@needs_pools
def test_release_without_a_pool_is_harmless():
    def work() -> None:
        assert release_thread_pool() is True
        assert release_thread_pool() is True

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert float(torch.ones(2**22).sum()) == 2**22


@needs_pools
def test_the_scheduler_frees_its_pool_when_idle(tiny_pair):
    # a new ensemble: its scheduler thread takes torch's thread count (2 here) when it
    # starts, where a session fixture's would keep the unit tier's one
    members = [MemberSpec(source=tiny_pair[0], name="l"), MemberSpec(source=tiny_pair[1], name="g")]
    ens = Ensemble(members, min_anchors=50, **PLAIN)
    try:
        prompt = "The capital of France is"
        ens.generate(prompt, max_new_tokens=2, speculate=0)  # pools that persist
        release_thread_pool()
        time.sleep(0.2)
        before = _tasks()
        during: set[int] = set()
        for _ in ens.stream(prompt, max_new_tokens=6, speculate=0):
            during |= _tasks() - before
        # new workers: the first request's pool was freed when the scheduler went idle
        assert during, "no new OpenMP worker while decoding: the scheduler kept its old pool"
        assert _gone(during), "the scheduler kept its OpenMP workers while idle"
        assert ens.generate(prompt, max_new_tokens=2, speculate=0).text  # still decodes
    finally:
        ens.close()


def test_the_scheduler_follows_the_submitters_thread_count(tiny_pair):
    # torch.set_num_threads reaches only the calling thread (and threads that never ran
    # parallel work): the scheduler's thread, started by the first request, takes the
    # count of the thread that submits each request
    members = [MemberSpec(source=tiny_pair[0], name="l"), MemberSpec(source=tiny_pair[1], name="g")]
    ens = Ensemble(members, min_anchors=50, **PLAIN)
    seen: list[int] = []
    body = ens.members[0].model.model
    hook = body.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        prompt = "The capital of France is"
        ens.generate(prompt, max_new_tokens=2, speculate=0)
        assert set(seen) == {2}
        torch.set_num_threads(1)  # after the scheduler's thread started
        seen.clear()
        ens.generate(prompt, max_new_tokens=2, speculate=0)
        assert seen and set(seen) == {1}
        torch.set_num_threads(2)
        seen.clear()
        ens.generate(prompt, max_new_tokens=2, speculate=0)
        assert seen and set(seen) == {2}
    finally:
        hook.remove()
        ens.close()
