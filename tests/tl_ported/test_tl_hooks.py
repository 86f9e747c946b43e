"""The hook lifecycle on the three families.

Mirrors TransformerLens' tests/integration/test_hooks.py with token inputs on the tiny random models: temporary and
permanent hooks, the ``hooks`` context manager (nested, with a failure, with ``reset_hooks`` inside, around
``run_with_cache``), backward hooks (returning a tuple, a bare tensor, None), removing hooks, and prepending. Adapted:

- TransformerLens' "conditional hooks" (``set_use_attn_result`` and friends switch extra hook points on) have no
  counterpart here; the equivalent is ``hook_state``, which is built only while something listens: caching it alone
  gives exactly that key with shape [batch, pos, head, d_k * d_v].
- The prepend test zeroes the last block's ``hook_resid_post`` (the original's model has one layer, whose logits are
  then the unembedding bias); here the logits are then ``unembed(ln_final(0))`` whatever the earlier layers did.
"""

import pytest
import torch

from tl_helpers import random_tokens

embed = lambda name: name == "hook_embed"  # noqa: E731


class Counter:
    def __init__(self):
        self.count = 0

    def inc(self, *args, **kwargs):
        self.count += 1


@pytest.fixture()
def tokens(model):
    yield random_tokens(model, n_pos=5)
    model.remove_all_hook_fns(including_permanent=True)


def n_fwd(model, name="hook_embed"):
    return len(model.hook_dict[name].fwd_hooks)


def test_hook_attaches_normally(model, tokens):
    c = Counter()
    model.run_with_hooks(tokens, fwd_hooks=[(embed, c.inc)])
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())
    assert c.count == 1


def test_perma_hook_attaches_normally(model, tokens):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    assert n_fwd(model) == 1
    model.run_with_hooks(tokens, fwd_hooks=[])
    assert n_fwd(model) == 1 and c.count == 1


def test_hook_context_manager(model, tokens):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert n_fwd(model) == 1
        model(tokens)
    assert n_fwd(model) == 0 and c.count == 1


def test_nested_hook_context_manager(model, tokens):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        model(tokens)
        with model.hooks(fwd_hooks=[(embed, c.inc)]):
            assert n_fwd(model) == 2
            model(tokens)
            assert c.count == 3
        assert n_fwd(model) == 1
    assert n_fwd(model) == 0 and c.count == 3


def test_context_manager_run_with_cache(model, tokens):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        model.run_with_cache(tokens)
        assert n_fwd(model) == 1
    assert n_fwd(model) == 0 and c.count == 1


def test_backward_hook_runs_successfully(model, tokens):
    c = Counter()

    def skip_grad(grad, hook):
        c.inc()
        return (grad,)

    with model.hooks(bwd_hooks=[(embed, skip_grad)]):
        out = model(tokens)
        assert c.count == 0
        out.sum().backward()
    assert len(model.hook_dict["hook_embed"].bwd_hooks) == 0 and c.count == 1
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("returns", ["bare tensor", "none"])
def test_backward_hook_return_forms(model, tokens, returns):
    c = Counter()
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_pre"

    def hook(grad, hook):
        c.inc()
        return grad if returns == "bare tensor" else None

    with model.hooks(bwd_hooks=[(last, hook)]):
        model(tokens).sum().backward()
    assert c.count == 1
    model.zero_grad(set_to_none=True)


def test_hook_context_manager_with_permanent_hook(model, tokens):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        assert n_fwd(model) == 2
        model(tokens)
    assert n_fwd(model) == 1 and c.count == 2


def test_nested_context_manager_with_failure(model, tokens):
    def fail_hook(z, hook):
        raise ValueError("fail")

    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        with pytest.raises(ValueError, match="fail"):
            with model.hooks(fwd_hooks=[(embed, fail_hook)]):
                assert n_fwd(model) == 2
                model(tokens)
        assert n_fwd(model) == 1 and c.count == 1
    assert n_fwd(model) == 0


def test_reset_hooks_in_context_manager(model, tokens):
    c = Counter()
    with model.hooks(fwd_hooks=[(embed, c.inc)]):
        model.reset_hooks()
        assert n_fwd(model) == 0
    assert n_fwd(model) == 0


def test_remove_hook(model, tokens):
    c = Counter()
    model.add_perma_hook(embed, c.inc)
    model.remove_all_hook_fns()
    assert n_fwd(model) == 1  # permanent hooks stay without the flag
    model.remove_all_hook_fns(including_permanent=True)
    assert n_fwd(model) == 0
    model.run_with_hooks(tokens, fwd_hooks=[])
    assert c.count == 0


def test_state_hook_is_built_only_for_listeners(model, tokens):
    """The counterpart of the original's conditional hooks (see the module docstring)."""
    name = f"blocks.{model.cfg.recurrent_layers[0]}.mixer.hook_state"
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    assert list(cache.keys()) == [name]
    assert cache[name].shape == (1, 5, model.cfg.n_heads, model.cfg.d_k * model.cfg.d_v)


@pytest.mark.parametrize("zero_attach_pos,prepend", [(z, p) for z in range(2) for p in (True, False)])
def test_prepending_hooks(model, tokens, zero_attach_pos, prepend):
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def set_to_zero(z, hook):
        z[:] = 0.0
        return z

    def set_to_randn(z, hook):
        return torch.randn_like(z) * 0.1

    model.reset_hooks()
    for index in range(2):
        model.add_hook(last, set_to_zero if index == zero_attach_pos else set_to_randn, prepend=prepend)
    with torch.no_grad():
        logits = model(tokens)
        zero_logits = model.unembed(model.ln_final(torch.zeros(1, 1, model.cfg.d_model, dtype=logits.dtype)))
    model.reset_hooks()
    zero_ran_last = (zero_attach_pos == 1) != prepend
    assert torch.allclose(logits, zero_logits.expand_as(logits), atol=1e-6) == zero_ran_last
