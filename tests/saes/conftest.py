"""WriteSAE tests run on tiny tensors: one intra-op thread avoids thread-wake stalls that, on a
shared 2-core machine, make each tiny op hundreds of times slower."""

import pytest


@pytest.fixture(autouse=True)
def _single_thread_torch(one_thread):
    """Every test here on one torch thread (tests/conftest.py's ``one_thread``)."""
    yield
