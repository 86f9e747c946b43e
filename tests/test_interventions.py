"""The intervention helpers (``writesae_lens.interventions``) on every family, against that family's plain float64
token-by-token reference: Gated DeltaNet (Qwen3.5 hybrid with GQA and d_k != d_v), Mamba-2 (d_state != head_dim) and
RWKV-7 (DPLR transition, d_k != d_v). The helpers hold no per-family code; only the reference differs."""

import pytest
import torch

from naive_recurrence import naive_edited_layer
from rwkv7_factory import random_rwkv7
from rwkv7_naive import naive_rwkv7_layer
from sae_checks import firing_sae
from writesae_lens import interventions as iv
from writesae_lens.evaluation.substitution import head_states

LAYER, HEAD = 1, 2
WRITE = ("hook_read_q", "hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay")


def gated_delta_reference(delta_rule):
    def naive(f, **edits):
        return naive_edited_layer(*(f[n] for n in WRITE), delta_rule=delta_rule, **edits)[0].float()

    return naive, WRITE


def dplr_reference(f, **edits):
    q, k, v, beta, w = (f[n] for n in WRITE)
    return naive_rwkv7_layer(q, k, v, w, f["hook_erase_a"], f["hook_erase_b"], beta=beta, **edits)[0].float()


@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def family(request, qwen35_pair, mamba2_pair):
    """(model, passages, native factors of layer LAYER, naive reference, SAE on head HEAD)."""
    if request.param == "rwkv7":
        model, (naive, names) = random_rwkv7(97), (dplr_reference, (*WRITE, "hook_erase_a", "hook_erase_b"))
    else:
        model = {"qwen35": qwen35_pair, "mamba2": mamba2_pair}[request.param][1]
        naive, names = gated_delta_reference(delta_rule=request.param == "qwen35")
    passages = torch.randint(0, 90, (3, 40), generator=torch.Generator().manual_seed(31))
    with torch.no_grad():
        _, cache = model.run_with_cache(passages, names_filter=[iv.mixer_hook(LAYER, n) for n in names])
    native = {n: cache[iv.mixer_hook(LAYER, n)] for n in names}
    sae = firing_sae(model, passages, LAYER, HEAD)
    return model, passages, native, naive, sae


def reads_with(model, passages, hooks):
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(passages, names_filter=iv.mixer_hook(LAYER, "hook_read"))
    return cache[iv.mixer_hook(LAYER, "hook_read")]


CELLS = [(0, 4, HEAD), (1, 20, 0), (2, 39, HEAD)]


def native_write(native, b, t, h):
    return native["hook_write_beta"][b, t, h] * torch.outer(native["hook_write_k"][b, t, h], native["hook_write_v"][b, t, h])


def assert_matches(got, expected):
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("timing", ["after_read", "write"])
def test_delete_and_substitute_match_naive(family, timing):
    model, passages, native, naive, sae = family
    atoms = iv.atom_matrices(sae, [3, 5, 7], 3)
    coefficients = torch.tensor([0.5, 2.0, -1.0])
    hooks = iv.substitute_atom(LAYER, CELLS, sae, [3, 5, 7], coefficients, "natural", timing)
    key = "adds_after" if timing == "after_read" else "adds_before"
    expected = {c: coefficients[i] * atoms[i] - native_write(native, *c) for i, c in enumerate(CELLS)}
    assert_matches(reads_with(model, passages, hooks), naive(native, **{key: expected}))
    deleted = {c: -native_write(native, *c) for c in CELLS}
    assert_matches(reads_with(model, passages, iv.delete_write(LAYER, CELLS, timing)), naive(native, **{key: deleted}))


def test_native_norm_amplitude_and_direction(family):
    model, passages, native, naive, sae = family
    hooks = iv.substitute_atom(LAYER, CELLS, sae, 4, amplitude="native_norm", timing="write")
    atom = iv.atom_matrices(sae, [4], 1)[0]
    expected = {}
    for c in CELLS:
        w = native_write(native, *c)
        expected[c] = atom * (w.norm() / atom.norm()) - w
    assert_matches(reads_with(model, passages, hooks), naive(native, adds_before=expected))
    key, value = torch.randn(model.cfg.d_k), torch.randn(model.cfg.d_v)
    direction = torch.outer(key, value) / torch.outer(key, value).norm()
    hooks = iv.add_direction(LAYER, CELLS, key, value, relative_magnitude=0.5)
    expected = {c: 0.5 * native_write(native, *c).norm() * direction for c in CELLS}
    assert_matches(reads_with(model, passages, hooks), naive(native, adds_before=expected))


def test_random_controls_have_the_requested_norms(family):
    model, passages, native, naive, sae = family
    generator = torch.Generator().manual_seed(3)
    gaussian = iv.gaussian_rank1(model.cfg.d_k, model.cfg.d_v, [0.5, 2.0], generator)
    assert torch.allclose(gaussian.flatten(1).norm(dim=-1), torch.tensor([0.5, 2.0]))
    assert (torch.linalg.matrix_rank(gaussian) == 1).all()
    hooks = iv.replace_write(LAYER, CELLS[:2], lambda native_factors: gaussian, "after_read")
    expected = {c: gaussian[i] - native_write(native, *c) for i, c in enumerate(CELLS[:2])}
    assert_matches(reads_with(model, passages, hooks), naive(native, adds_after=expected))


def test_amplify_features_adds_to_every_position(family):
    model, passages, native, naive, sae = family
    hooks = iv.amplify_features(LAYER, HEAD, sae, {1: 0.3, 2: -0.2})
    atoms = iv.atom_matrices(sae, [1, 2], 2)
    matrix = 0.3 * atoms[0] - 0.2 * atoms[1]
    b, p = passages.shape
    expected = {(i, t, HEAD): matrix for i in range(b) for t in range(p)}
    assert_matches(reads_with(model, passages, hooks), naive(native, adds_before=expected))
    prompt = passages[:1, :5]
    with model.hooks(fwd_hooks=hooks):
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False,
                                  use_past_kv_cache=False)
    assert torch.equal(cached, uncached)


def test_erase_atom_removes_its_contribution(family):
    """Wherever the atom is active in S_t, S_t is replaced by S_t - a_i(t) A_i and the recurrence continues."""
    model, passages, native, naive, sae = family
    states, _ = head_states(model, passages, LAYER, HEAD)
    codes = sae.encode(states).detach()
    atom = int(codes.flatten(0, 1).gt(0).sum(0).argmax())
    matrix = iv.atom_matrices(sae, [atom], 1)[0]
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    sets = {(b, t, HEAD): states[b, t].reshape(d_k, d_v) - codes[b, t, atom] * matrix
            for b, t in (codes[..., atom] > 0).nonzero().tolist()}
    assert len(sets) >= 2
    assert_matches(reads_with(model, passages, iv.erase_atom(LAYER, HEAD, sae, atom)), naive(native, state_sets=sets))


def test_helpers_reject_bad_cells(family):
    model, passages, native, naive, sae = family
    with pytest.raises(IndexError, match="position 99 out of range"):
        model.run_with_hooks(passages, fwd_hooks=iv.delete_write(LAYER, [(0, 99, 0)]))
    with pytest.raises(ValueError, match=r"shape \[n, 3\]"):
        iv.delete_write(LAYER, [(0, 1)])
    with pytest.raises((ValueError, TypeError), match="timing"):  # beartype's check under the test hook
        iv.delete_write(LAYER, [(0, 1, 0)], timing="later")
    with pytest.raises(ValueError, match="atoms must be"):
        iv.substitute_atom(LAYER, [(0, 1, 0)], sae, [99], [1.0])
