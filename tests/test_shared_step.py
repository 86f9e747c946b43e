"""One-token rows from shared snapshot states (``ops/shared_step.py``, ``rows_from_snapshots(shared_states=True)``):
the batched read equals the literal step, the literal step equals each family's recurrence, and a cache of shared
rows gives the logits of a cache with a state per row, on all three families (GQA, d_k != d_v)."""

from __future__ import annotations

import pytest
import torch

from rwkv7_factory import random_rwkv7
from writesae_lens.ops.adjoint import dplr_form
from writesae_lens.ops.dplr import dplr_reference
from writesae_lens.ops.gated_delta import recurrence_reference
from writesae_lens.ops.shared_step import shared_step_reads, shared_step_reads_reference

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS, HEADS, D_K, D_V, SOURCES = 11, 3, 5, 7, 4
SOURCE = torch.tensor([3, 1, 1, 0, 3, 3, 1, 2, 2, 0, 3])  # unsorted, repeated, every source used


def _factors(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, u = rand(ROWS, HEADS, D_K), rand(ROWS, HEADS, D_K), rand(ROWS, HEADS, D_V)
    if kind == "mamba2":  # scalar decay per head, no erase
        return q, k, u, -torch.rand(ROWS, HEADS, generator=g, dtype=torch.float64), None, None
    if kind == "gated_deltanet":  # the delta rule, written as DPLR by dplr_form
        log_decay = -torch.rand(ROWS, HEADS, generator=g, dtype=torch.float64)
        beta = torch.rand(ROWS, HEADS, generator=g, dtype=torch.float64)
        return q, k, u, *dplr_form(log_decay, k, beta)
    return q, k, u, -torch.rand(ROWS, HEADS, D_K, generator=g, dtype=torch.float64), rand(ROWS, HEADS, D_K), \
        rand(ROWS, HEADS, D_K)


@pytest.mark.parametrize("kind", ["gated_deltanet", "mamba2", "dplr"])
@pytest.mark.parametrize("edited", [False, True])
def test_batched_read_equals_the_literal_step(kind, edited):
    q, k, u, w, ea, eb = _factors(kind)
    shared = torch.randn(SOURCES, HEADS, D_K, D_V, dtype=torch.float64)
    edit = torch.randn(ROWS, D_K, D_V, dtype=torch.float64) if edited else None
    head = 2 if edited else None
    fast = shared_step_reads(q, k, u, w, ea, eb, shared, SOURCE, edit, head)
    literal = shared_step_reads_reference(q, k, u, w, ea, eb, shared, SOURCE, edit, head)
    assert fast.shape == (ROWS, HEADS, D_V)
    torch.testing.assert_close(fast, literal, rtol=1e-12, atol=1e-12)
    # a source no row uses is skipped, one row per source, and one source for all rows
    for source in (torch.tensor([0, 2] * 5 + [0]), torch.arange(ROWS) % SOURCES, torch.zeros(ROWS, dtype=torch.long)):
        torch.testing.assert_close(shared_step_reads(q, k, u, w, ea, eb, shared, source, edit, head),
                                   shared_step_reads_reference(q, k, u, w, ea, eb, shared, source, edit, head),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gated_deltanet", "mamba2", "dplr"])
def test_literal_step_equals_the_family_recurrence(kind):
    """The reference is the recurrences' own first step from the row's state (edit included)."""
    q, k, u, w, ea, eb = _factors(kind, seed=1)
    shared = torch.randn(SOURCES, HEADS, D_K, D_V, dtype=torch.float64)
    edit = torch.randn(ROWS, D_K, D_V, dtype=torch.float64)
    initial = shared[SOURCE].clone()
    initial[:, 1] += edit
    one = lambda x: x[:, None]  # noqa: E731  [rows, ...] -> [rows, 1 position, ...]
    if kind == "dplr":
        reads, _, _ = dplr_reference(one(q), one(k), one(u), one(w), one(ea), one(eb), initial)
    elif kind == "mamba2":
        reads, _, _ = recurrence_reference(one(q), one(k), one(u), one(w), None, initial)
    else:  # recover the delta rule's log decay and strength from its DPLR form: w = g, ea = exp(g) beta k, eb = k
        log_decay = w[..., 0]
        beta = (ea / (log_decay.exp()[..., None] * k))[..., 0]
        reads, _, _ = recurrence_reference(one(q), one(k), one(u), one(log_decay), one(beta), initial)
    torch.testing.assert_close(shared_step_reads_reference(q, k, u, w, ea, eb, shared, SOURCE, edit, 1), reads[:, 0],
                               rtol=1e-10, atol=1e-10)


def _family_model(name, qwen35_pair, mamba2_pair):
    if name == "qwen35":
        return qwen35_pair[1]
    if name == "mamba2":
        return mamba2_pair[1]
    return random_rwkv7(64).eval()


def _snapshot_cache(model, tokens, positions):
    cache = model.empty_cache()
    cache.request_snapshots(positions, range(model.cfg.n_layers))
    with torch.no_grad():
        model(tokens, cache=cache)
    return cache


@pytest.mark.parametrize("family", ["qwen35", "mamba2", "rwkv7"])
def test_shared_rows_give_the_logits_of_rows_with_their_own_states(family, qwen35_pair, mamba2_pair):
    model = _family_model(family, qwen35_pair, mamba2_pair).float()
    torch.manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12))
    positions = torch.tensor([[3, 7, 9], [2, 5, 9]])  # per passage
    cache = _snapshot_cache(model, tokens, positions)
    which = torch.tensor([0, 0, 1, 2, 2, 1, 0, 1])
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    starts = positions[rows, which]
    layer = next(i for i, block in enumerate(model.blocks) if hasattr(block.mixer, "recur_with_cache"))
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    edits = torch.randn(len(rows), d_k, d_v) * 0.3
    next_tokens = tokens[rows, starts][:, None]
    two_tokens = torch.stack([tokens[rows, starts], tokens[rows, starts + 1]], dim=1)

    def run(shared: bool, inputs, hooks=()):
        rows_cache = cache.rows_from_snapshots(which, rows, shared_states=shared)
        rows_cache.add_to_state(layer, 1, edits)
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            return model(inputs, cache=rows_cache), rows_cache

    own, _ = run(False, next_tokens)
    shared, spent = run(True, next_tokens)
    torch.testing.assert_close(shared, own, rtol=1e-5, atol=1e-5)
    assert (shared - run(True, next_tokens[:, :1])[0]).abs().max() == 0  # deterministic
    # two tokens, or a hook on the mixer: each row gets its state first (the same numbers)
    torch.testing.assert_close(run(True, two_tokens)[0], run(False, two_tokens)[0], rtol=1e-5, atol=1e-5)
    listener = (f"blocks.{layer}.mixer.hook_read", lambda x, hook: None)
    torch.testing.assert_close(run(True, next_tokens, [listener])[0], own, rtol=1e-5, atol=1e-5)
    # a spent cache says so instead of continuing from nothing
    with pytest.raises(ValueError, match="keep no state of their own after their one-token step"):
        with torch.no_grad():
            model(next_tokens, cache=spent)
    with pytest.raises(ValueError, match="shared snapshot states"):
        spent.recurrent_state(layer)


def test_shared_rows_of_several_passes_stack(qwen35_pair):
    """``stack_rows`` of shared-state caches from two snapshot passes equals the per-row caches stacked."""
    model = qwen35_pair[1]
    torch.manual_seed(1)
    tokens_a, tokens_b = (torch.randint(0, model.cfg.d_vocab, (1, 10)) for _ in range(2))
    cache_a, cache_b = _snapshot_cache(model, tokens_a, torch.tensor([4, 6])), \
        _snapshot_cache(model, tokens_b, torch.tensor([2, 8]))
    from writesae_lens.hooking.cache import RecurrentCache

    which_a, which_b = torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1])
    inputs = torch.cat([tokens_a[0, [6, 4, 6]], tokens_b[0, [2, 2, 8]]])[:, None]
    outputs = []
    for shared in (False, True):
        stacked = RecurrentCache.stack_rows([cache_a.rows_from_snapshots(which_a, shared_states=shared),
                                             cache_b.rows_from_snapshots(which_b, shared_states=shared)])
        with torch.no_grad():
            outputs.append(model(inputs, cache=stacked))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
