"""WriteSAE tests run on tiny tensors: one intra-op thread avoids thread-wake stalls that, on a
shared 2-core machine, make each tiny op hundreds of times slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_torch():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
