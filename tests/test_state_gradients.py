"""Gradients through the write interface (#14 part 2): every mixer hook point carries gradients at an identity edit.

Attribution patching on the state needs ``d loss / d a`` of an edit ``x + a r`` at ``a = 0``. Checked here in float64
on the three families (the non-square GQA Qwen3.5, the grouped non-square Mamba-2, a non-square RWKV-7) against
central finite differences, plus: the adjoint of the chunked recurrences against autograd through a token-by-token
loop, backward hooks and ``run_with_cache(incl_bwd=True)`` against ``torch.autograd.grad``, and the parameters'
gradients unchanged by identity hooks. (The TransformerLens counterpart of the cache check is its
``tests/integration/test_hooks.py`` backward-hook tests, re-written here for the write interface.)
"""

import copy

import pytest
import torch

from family_models import family_model
from writesae_lens.ops.adjoint import dplr_form, state_adjoint

pytestmark = pytest.mark.usefixtures("one_thread")

N_POS = 21
EPS = 1e-6  # central differences in float64: truncation ~EPS^2, rounding ~1e-16 / EPS
WRITE_HOOKS = ["hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay", "hook_read_q", "hook_read"]
EXTRA_HOOKS = {"rwkv7": ["hook_erase_a", "hook_erase_b"], "mamba2": ["hook_skip", "hook_ssm_out", "hook_gate"],
               "qwen35": ["hook_gate"]}


# ---------------------------------------------------------------- the adjoint, against autograd through a loop

def _loop_reads(q, k, u, w, ea, eb, perturb, cuts, start):
    """Token by token, fp64: S_t = (diag(exp(w)) - ea eb^T) S_{t-1} + k u^T + perturb_t, except that a cut cell's
    state does not depend on the previous one (it is its own value, detached); reads S_t^T q_t, final state."""
    state, reads = start, []
    for t in range(q.shape[1]):
        carried = state * w[:, t].exp()[..., None]
        if ea is not None:
            carried = carried - ea[:, t, ..., :, None] * torch.einsum("bhkv,bhk->bhv", state, eb[:, t])[..., None, :]
        new = carried + k[:, t, ..., :, None] * u[:, t, ..., None, :] + perturb[:, t]
        if cuts is not None:
            new = torch.where(cuts[:, t, :, None, None], new.detach() + perturb[:, t] - perturb[:, t].detach(), new)
        state = new
        reads.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    return torch.stack(reads, 1), state


@pytest.mark.parametrize("kind", ["decay", "delta", "dplr"])
@pytest.mark.parametrize("with_cuts", [False, True])
def test_state_adjoint_is_the_gradient_of_every_state(kind, with_cuts):
    """lam_t = dL/dS_t from the reversed chunked recurrence equals autograd through a token-by-token loop (70
    positions: more than one chunk of every algorithm), with and without replaced (cut) states."""
    gen = torch.Generator().manual_seed(0)
    b, p, h, dk, dv = 2, 70, 3, 5, 7
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, u = rand(b, p, h, dk), rand(b, p, h, dk), rand(b, p, h, dv)
    k = k / k.norm(dim=-1, keepdim=True)
    if kind == "decay":
        log_decay, w, ea, eb = -rand(b, p, h).abs() * 0.3, None, None, None
        forms = (log_decay, None, None)
        w = log_decay[..., None].expand(b, p, h, dk)
    elif kind == "delta":
        log_decay, erase = -rand(b, p, h).abs() * 0.3, torch.rand(b, p, h, generator=gen, dtype=torch.float64)
        forms = (log_decay, k, erase)
        w, ea, eb = dplr_form(log_decay, k, erase)
    else:
        w = -rand(b, p, h, dk).abs() * 0.3
        eb = rand(b, p, h, dk)
        eb = eb / eb.norm(dim=-1, keepdim=True)
        ea = eb * torch.rand(b, p, h, 1, generator=gen, dtype=torch.float64)
        forms = (w, ea, eb)
    cuts = None
    if with_cuts:
        cuts = torch.zeros(b, p, h, dtype=torch.bool)
        cuts[0, 10, 1] = cuts[0, 40, 1] = cuts[1, 69, 2] = cuts[1, 0, 0] = cuts[0, 33, 0] = True
    perturb = torch.zeros(b, p, h, dk, dv, dtype=torch.float64, requires_grad=True)
    start = rand(b, h, dk, dv)
    grad_reads, grad_final = rand(b, p, h, dv), rand(b, h, dk, dv)
    reads, final = _loop_reads(q, k, u, w, ea, eb, perturb, cuts, start)
    (expected,) = torch.autograd.grad((reads * grad_reads).sum() + (final * grad_final).sum(), perturb)
    ours = state_adjoint(q, grad_reads, grad_final, *dplr_form(*forms) if kind == "delta" else forms, cuts=cuts)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- the models, in float64

@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def family(request, qwen35_pair, mamba2_pair):
    """(family name, a float64 copy of its test model, tokens [2, N_POS], the first recurrent layer)."""
    model = copy.deepcopy(family_model(request.param, qwen35_pair, mamba2_pair)).double()
    tokens = torch.randint(0, 90, (2, N_POS), generator=torch.Generator().manual_seed(5))
    return request.param, model, tokens, model.cfg.recurrent_layers[0]


def _loss(logits, tokens):
    """Next-token cross-entropy in the logits' dtype (float64 here)."""
    return -torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None]).mean()


def _derivative_and_difference(model, tokens, hook_name, edit):
    """(d loss / d a at a = 0 by autograd, the central finite difference) for the forward hook ``edit(x, a)``."""

    def loss_at(a):
        with model.hooks(fwd_hooks=[(hook_name, lambda x, hook: edit(x, a))]):
            return _loss(model(tokens), tokens)

    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss_at(a), a)
    with torch.no_grad():
        difference = (loss_at(EPS) - loss_at(-EPS)) / (2 * EPS)
    return grad, difference


def _direction(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_every_mixer_hook_carries_the_derivative_of_an_edit(family):
    """``x + a r`` on every write, read and transition hook (r dense, entries ~ |x|): autograd's d loss / d a at
    a = 0 equals the finite difference (before the fix the write key gave None on the delta-rule and Mamba-2 models)."""
    name, model, tokens, layer = family
    for hook in WRITE_HOOKS + EXTRA_HOOKS[name]:
        hook_name = f"blocks.{layer}.mixer.{hook}"
        # r relative to x: a read can be tiny where the state is young, and the norm after it very curved there
        grad, difference = _derivative_and_difference(
            model, tokens, hook_name, lambda x, a: x + a * _direction(x.shape).to(x.dtype) * x.detach().abs()
        )
        assert abs(float(difference)) > 1e-6, hook  # the check can fail
        torch.testing.assert_close(grad, difference, rtol=1e-6, atol=1e-9, msg=lambda m: f"{hook}: {m}")


def _one_cell_per_row_and_head(shape):
    """A direction on hook_state that is non-zero at one position per (row, head), a different one each."""
    batch, n_pos, n_heads = shape[:3]
    r = torch.zeros(shape, dtype=torch.float64)
    dense = _direction(shape, seed=2)
    for b in range(batch):
        for h in range(n_heads):
            t = (3 + 7 * b + 4 * h) % n_pos
            r[b, t, h] = dense[b, t, h]
    return r


@pytest.mark.parametrize("at", [0.0, 0.5])
def test_state_edit_derivative_equals_the_finite_difference(family, at):
    """hook_state, r at one position per (row, head): the derivative at a = 0 (no cell changed: the adjoint) and at
    a = 0.5 (the cells are replaced: the edits' own gradient) equals the finite difference of the replacing edit."""
    name, model, tokens, layer = family
    hook_name = f"blocks.{layer}.mixer.hook_state"
    grad, difference = _derivative_and_difference(
        model, tokens, hook_name, lambda x, a: x + (at + a) * _one_cell_per_row_and_head(x.shape).to(x.dtype)
    )
    assert abs(float(difference)) > 1e-6
    torch.testing.assert_close(grad, difference, rtol=1e-6, atol=1e-9)


def test_dense_state_gradient_is_that_of_an_added_matrix(family):
    """For r at every cell the gradient of ``hook_state`` is <lam, r>, the derivative of adding ``a r`` to each
    state before its read and carrying it on: the finite difference of the same matrices through hook_write_add.
    (Replacing every state by ``x + a r`` is another function, whose states no longer carry earlier ones.)"""
    name, model, tokens, layer = family
    mixer = f"blocks.{layer}.mixer."
    grad, _ = _derivative_and_difference(model, tokens, mixer + "hook_state",
                                         lambda x, a: x + a * _direction(x.shape).to(x.dtype))

    def add_matrices(x, a):
        batch, n_pos, n_heads, d_k, d_v = x.shape
        r = _direction((batch, n_pos, n_heads, d_k * d_v)).reshape(batch, n_pos, n_heads, d_k, d_v)
        cells = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (batch, n_pos, n_heads)), indexing="ij"))
        return x + torch.sparse_coo_tensor(cells.reshape(3, -1), (a * r).reshape(-1, d_k, d_v), x.shape,
                                         check_invariants=True)

    _, difference = _derivative_and_difference(model, tokens, mixer + "hook_write_add", add_matrices)
    assert abs(float(difference)) > 1e-6
    torch.testing.assert_close(grad, difference, rtol=1e-6, atol=1e-9)


def test_state_gradient_stops_at_a_replaced_state(family):
    """A hook that replaces every head's state at position 12 of row 0 and edits x + a r at position 5: the
    derivative counts the reads from 5 up to 12 only, like the finite difference."""
    name, model, tokens, layer = family
    r5 = None

    def edit(x, a):
        nonlocal r5
        r5 = _direction(x[:, 5].shape, seed=4).to(x.dtype) if r5 is None else r5
        out = x.clone()
        out[0, 12] = 0.5 * x[0, 12].detach()
        out[:, 5] = x[:, 5] + a * r5
        return out

    grad, difference = _derivative_and_difference(model, tokens, f"blocks.{layer}.mixer.hook_state", edit)
    torch.testing.assert_close(grad, difference, rtol=1e-6, atol=1e-9)


def test_identity_hooks_leave_the_parameter_gradients_unchanged(family):
    """Hooks that return a copy of hook_state and hook_write_k (unchanged values) give the parameters the gradients
    of the plain model: the link to the hook outputs adds nothing to them."""
    name, model, tokens, layer = family
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(_loss(model(tokens), tokens), params, allow_unused=True)
    copies = [(f"blocks.{layer}.mixer.{h}", lambda x, hook: x.clone()) for h in ("hook_state", "hook_write_k")]
    with model.hooks(fwd_hooks=copies):
        hooked = torch.autograd.grad(_loss(model(tokens), tokens), params, allow_unused=True)
    for p, q in zip(plain, hooked):
        if p is None:
            assert q is None
        else:
            torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-13)


def test_backward_hooks_and_cache_gradients_equal_autograd(family):
    """run_with_cache(..., incl_bwd=True) has a ``_grad`` entry for every mixer hook of the layer (hook_state and
    hook_write_k included, which never fired before), each equal to torch.autograd.grad of the same loss with
    respect to that hook's output."""
    name, model, tokens, layer = family
    names = [f"blocks.{layer}.mixer.{h}" for h in ["hook_state"] + WRITE_HOOKS + EXTRA_HOOKS[name]]
    model.zero_grad(set_to_none=True)
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=names)
    cache = dict(cache.items())
    model.zero_grad(set_to_none=True)
    outputs = {}

    def keep(x, hook):  # the hook's output, as a tensor of its own (RWKV-7's write strength needs no gradient)
        outputs[hook.name] = x.clone().requires_grad_()
        return outputs[hook.name]

    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        loss = model(tokens, return_type="loss")
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    for n, g in zip(names, grads):
        assert f"{n}_grad" in cache, n
        assert g.abs().max() > 0, n
        torch.testing.assert_close(cache[f"{n}_grad"], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_gradient_through_states_a_hook_computes_from(family):
    """A hook that replaces the state at position 12 of row 0 by ``0.5 x`` (a function of the states shown): the
    derivative of an earlier write-value edit flows through the shown states into that replacement (the states are
    recomputed with autograd's tape in the backward) and equals the finite difference."""
    name, model, tokens, layer = family
    mixer = f"blocks.{layer}.mixer."

    def halve(x, hook):
        out = x.clone()
        out[0, 12] = 0.5 * x[0, 12]
        return out

    r = None

    def edit(x, a):
        nonlocal r
        r = _direction(x.shape, seed=6).to(x.dtype) * x.detach().abs() if r is None else r
        return x + a * r

    with model.hooks(fwd_hooks=[(mixer + "hook_state", halve)]):
        grad, difference = _derivative_and_difference(model, tokens, mixer + "hook_write_v", edit)
    assert abs(float(difference)) > 1e-6
    torch.testing.assert_close(grad, difference, rtol=1e-6, atol=1e-9)
