"""Unit tier: one torch thread per test module.

The tiny models' kernels are far too small to gain from a second thread, and on a busy
2-core machine (CI, or another test run beside this one) torch's spinning worker threads
slowed the tiny-model tests down dozens of times. Restored after each module, so the
integration tier (real models) keeps every core.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _relative_rows_in_a_temporary_folder(tmp_path_factory):
    """Relative rows the unit tier computes go to a temporary disk cache, not the user's."""
    from deepen_engine.fusion import context

    original = context.cache_dir
    folder = tmp_path_factory.mktemp("deepen-cache")
    context.cache_dir = lambda: folder
    yield folder
    context.cache_dir = original


@pytest.fixture(scope="module")
def server(tiny_ensemble):
    """The OpenAI-compatible server on the tiny ensemble, uvicorn on loopback: its URL."""
    pytest.importorskip("starlette")
    from deepen_engine.server import create_app
    from tests.conftest import running_server

    with running_server(create_app(tiny_ensemble, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    """The real `openai` client on `server`."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
