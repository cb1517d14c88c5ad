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
