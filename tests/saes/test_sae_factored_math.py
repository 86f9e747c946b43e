"""The fast factored math (writesae_lens.saes.factored) against the readable references."""

import pytest
import torch

from writesae_lens.saes import factored, reference

SHAPES = [  # (d_sae, rank, d_k, d_v)
    pytest.param(16, 1, 4, 6, id="F16-r1-4x6"),
    pytest.param(16, 2, 6, 4, id="F16-r2-6x4"),
    pytest.param(40, 3, 5, 5, id="F40-r3-5x5"),
]


def _factors(d_sae, rank, d_k, d_v, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(d_sae, rank, d_k, generator=gen, dtype=dtype)
    value = torch.randn(d_sae, rank, d_v, generator=gen, dtype=dtype)
    return key, value


def _sparse_code(n, d_sae, n_active, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    code = torch.zeros(n, d_sae, dtype=dtype)
    for row in range(n):
        count = row % (n_active + 1)  # rows with 0 .. n_active active atoms
        idx = torch.randperm(d_sae, generator=gen)[:count]
        code[row, idx] = torch.rand(count, generator=gen, dtype=dtype) + 0.1
    return code


@pytest.mark.parametrize("d_sae,rank,d_k,d_v", SHAPES)
def test_sparse_decode_matches_reference_and_dense_W_dec(d_sae, rank, d_k, d_v):
    key, value = _factors(d_sae, rank, d_k, d_v)
    code = _sparse_code(7, d_sae, n_active=3)
    sparse = factored.decode_code(code, key, value)
    expected = reference.reference_decode(code, key, value, torch.zeros(d_k, d_v, dtype=code.dtype))
    torch.testing.assert_close(sparse, expected, rtol=1e-12, atol=1e-12)
    # the dense path: code @ W_dec with W_dec = flattened atoms
    W_dec = factored.materialize_atoms(key, value).flatten(1, 2)
    torch.testing.assert_close(factored.matrices_as_states(sparse), code @ W_dec, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_sae,rank,d_k,d_v", SHAPES)
def test_sparse_decode_gradients_match_reference(d_sae, rank, d_k, d_v):
    key, value = _factors(d_sae, rank, d_k, d_v)
    code = _sparse_code(6, d_sae, n_active=4)
    upstream = torch.randn(6, d_k, d_v, dtype=code.dtype)
    grads = []
    for decode in (
        lambda c, p, q: factored.decode_code(c, p, q),
        lambda c, p, q: reference.reference_decode(c, p, q, torch.zeros(d_k, d_v, dtype=c.dtype)),
    ):
        c, p, q = (t.clone().requires_grad_() for t in (code, key, value))
        (decode(c, p, q) * upstream).sum().backward()
        # the code's gradient only matters on active entries (the rest are re-chosen by TopK)
        grads.append((c.grad * (code != 0), p.grad, q.grad))
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_dense_fallback_path_equals_sparse_path():
    key, value = _factors(16, 2, 4, 6)
    code = _sparse_code(5, 16, n_active=10)  # 10 * rank 2 > 0.25 * 16 -> dense path
    dense_path = factored.decode_code(code, key, value)
    sparse_path = factored.decode_code(code, key, value, max_active_fraction=10.0)
    torch.testing.assert_close(dense_path, sparse_path, rtol=1e-12, atol=1e-12)


def test_decode_of_all_zero_code_is_zero():
    key, value = _factors(16, 1, 4, 6)
    out = factored.decode_code(torch.zeros(3, 16, dtype=torch.float64), key, value)
    assert out.shape == (3, 4, 6) and not out.any()


@pytest.mark.parametrize("d_sae,rank,d_k,d_v", SHAPES)
def test_bilinear_filters_match_reference_einsum(d_sae, rank, d_k, d_v):
    key, value = _factors(d_sae, rank, d_k, d_v)
    states = torch.randn(9, d_k, d_v, dtype=torch.float64)
    b_enc = torch.randn(d_sae, dtype=torch.float64)
    fast = torch.nn.functional.linear(
        factored.matrices_as_states(states), factored.bilinear_filters(key, value), b_enc
    )
    slow = reference.reference_bilinear_preactivations(states, key, value, b_enc)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    # and against an explicit loop over latents and ranks: z_i = sum_r u^T X w + b_i
    i, r = d_sae - 1, rank - 1
    loop = sum(key[i, s] @ states[2] @ value[i, s] for s in range(r + 1)) + b_enc[i]
    torch.testing.assert_close(fast[2, i], loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_sae,rank,d_k,d_v", SHAPES)
def test_bilinear_filters_gradients_match_reference(d_sae, rank, d_k, d_v):
    key, value = _factors(d_sae, rank, d_k, d_v)
    states = torch.randn(5, d_k, d_v, dtype=torch.float64)
    b_enc = torch.zeros(d_sae, dtype=torch.float64)
    upstream = torch.randn(5, d_sae, dtype=torch.float64)
    grads = []
    for encode in (
        lambda p, q: factored.matrices_as_states(states) @ factored.bilinear_filters(p, q).T,
        lambda p, q: reference.reference_bilinear_preactivations(states, p, q, b_enc),
    ):
        p, q = key.clone().requires_grad_(), value.clone().requires_grad_()
        (encode(p, q) * upstream).sum().backward()
        grads.append((p.grad, q.grad))
    for fast, slow in zip(*grads):
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_flattening_is_row_major_key_first():
    matrix = torch.arange(12.0).reshape(3, 4)  # [d_k=3, d_v=4]
    flat = factored.matrices_as_states(matrix)
    assert flat[1 * 4 + 2] == matrix[1, 2]
    torch.testing.assert_close(factored.states_as_matrices(flat, 3, 4), matrix)


@pytest.mark.parametrize("d_sae,rank,d_k,d_v", SHAPES)
def test_atom_norms_match_materialised_atoms(d_sae, rank, d_k, d_v):
    key, value = _factors(d_sae, rank, d_k, d_v)
    expected = factored.materialize_atoms(key, value).flatten(1, 2).norm(dim=-1)
    torch.testing.assert_close(factored.atom_frobenius_norms(key, value), expected)


def test_normalize_factor_rows_gives_unit_rows_and_keeps_directions():
    key, _ = _factors(16, 2, 4, 6)
    before = key.clone()
    factored.normalize_factor_rows_(key)
    torch.testing.assert_close(key.norm(dim=-1), torch.ones(16, 2, dtype=key.dtype))
    cosine = (key * before).sum(-1) / before.norm(dim=-1)
    torch.testing.assert_close(cosine, torch.ones(16, 2, dtype=key.dtype))
