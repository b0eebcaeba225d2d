"""Demo tests run torch single-threaded: the demo models are tiny, and on a busy 2-core
machine two intra-op threads per process make them an order of magnitude slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
