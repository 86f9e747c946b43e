"""Shared fixtures for SAELens' own tests, ported to WriteSAEs (issue #20).

Every test here mirrors a test of SAELens (github.com/decoderesearch/SAELens, tests/...; the module docstrings name
the file) rewritten for factored decoders and parametrised over the write architectures x rank 1 / 2 x bilinear /
dense encoders. Shapes are tiny (d_k = 4, d_v = 6, non-square so a key/value swap cannot pass); one intra-op thread.
"""

import pytest

from ported_saes import VARIANTS, variant_id


@pytest.fixture(autouse=True)
def _single_thread_torch(one_thread):
    """Every test here on one torch thread (tests/conftest.py's ``one_thread``)."""
    yield


@pytest.fixture(params=VARIANTS, ids=[variant_id(v) for v in VARIANTS])
def variant(request):
    """(architecture, rank, encoder_kind) for every write architecture."""
    return request.param


@pytest.fixture(params=[v for v in VARIANTS if v[0] != "write_batchtopk"],
                ids=[variant_id(v) for v in VARIANTS if v[0] != "write_batchtopk"])
def inference_variant(request):
    """The variants with an inference class of their own (BatchTopK saves as JumpReLU)."""
    return request.param
