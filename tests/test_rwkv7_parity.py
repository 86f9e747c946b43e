"""HookedRWKV7 against fla's RWKV7ForCausalLM: golden fixtures written by scripts/make_rwkv7_fixture.py (fla 0.6.0's
recurrent kernels under TRITON_INTERPRET=1; fla cannot run in this environment), plus the hook identities of the
write interface on the same checkpoints. Every test that takes ``model_and_golden`` runs on both fixtures: square heads
(d_k = d_v = 16) and non-square heads (d_k = 16, d_v = 32)."""

from pathlib import Path

import pytest
import torch

from closeness import relative_error
from rwkv7_naive import naive_rwkv7_layer
from writesae_lens.adapters.rwkv7 import HookedRWKV7


FIXTURES = Path(__file__).parent / "fixtures"
FACTORS = ("hook_read_q", "hook_write_k", "hook_write_v", "hook_decay", "hook_erase_a", "hook_erase_b")
# fixture folder: (n_layers, n_heads, d_k, d_v, d_mlp, d_vocab) of its checkpoint
CONFIGS = {"rwkv7": (3, 4, 16, 16, 96, 97), "rwkv7_nonsquare": (3, 4, 16, 32, 96, 97)}


def load_fixture(name):
    folder = FIXTURES / name
    if not (folder / "golden.pt").exists():
        pytest.skip(f"no golden fixture in {folder}: run scripts/make_rwkv7_fixture.py")
    model = HookedRWKV7.from_pretrained(folder / "checkpoint", device="cpu").eval()
    return model, torch.load(folder / "golden.pt")


@pytest.fixture(scope="module", params=list(CONFIGS))
def fixture_name(request):
    return request.param


@pytest.fixture(scope="module")
def model_and_golden(fixture_name):
    return load_fixture(fixture_name)


def test_config_read_without_fla(model_and_golden, fixture_name):
    model, _ = model_and_golden
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_k, cfg.d_v, cfg.d_mlp, cfg.d_vocab) == CONFIGS[fixture_name]


def test_logits_and_states_match_fla(model_and_golden):
    model, golden = model_and_golden
    cache = model.empty_cache()
    with torch.no_grad():
        logits = model(golden["tokens"], cache=cache)
    assert relative_error(logits, golden["logits"]) < 1e-5
    states = torch.stack([cache.recurrent_state(layer) for layer in range(model.cfg.n_layers)], dim=1)
    assert relative_error(states, golden["states"]) < 1e-5


def test_continuing_from_the_cache(model_and_golden):
    model, golden = model_and_golden
    tokens, split = golden["tokens"], golden["split"]
    cache = model.empty_cache()
    with torch.no_grad():
        first = model(tokens[:, :split], cache=cache)
        step = model(tokens[:, split : split + 1], cache=cache)  # one decoding step: token shift and state carried
        rest = model(tokens[:, split + 1 :], cache=cache)
    assert relative_error(torch.cat([first, step, rest], 1), golden["split_logits"]) < 1e-5


def test_state_hook_follows_the_recurrence_from_the_write_hooks(model_and_golden):
    model, golden = model_and_golden
    layer = 1
    names = [f"blocks.{layer}.mixer.{n}" for n in FACTORS + ("hook_write_beta", "hook_state", "hook_read")]
    with torch.no_grad():
        _, cache = model.run_with_cache(golden["tokens"], names_filter=names)
    f = [cache[f"blocks.{layer}.mixer.{n}"] for n in FACTORS]
    beta = cache[f"blocks.{layer}.mixer.hook_write_beta"]
    assert torch.equal(beta, torch.ones_like(beta))
    reads, _, traj = naive_rwkv7_layer(*f)
    states = cache[f"blocks.{layer}.mixer.hook_state"]
    assert relative_error(states, traj.reshape(states.shape).float()) < 1e-5
    assert relative_error(cache[f"blocks.{layer}.mixer.hook_read"], reads.float()) < 1e-5
    erase_a, erase_b = f[4], f[5]
    assert torch.allclose(erase_b.norm(dim=-1), torch.ones(erase_b.shape[:-1]), atol=1e-5)  # kk is unit-norm
    assert (f[3] <= 0).all() and (f[3] >= -0.6066).all()  # w = -exp(-1/2) sigmoid(.)
    assert ((erase_a / erase_b).nan_to_num(0.5) >= 0).all()  # ea = kk * a with a in (0, 1)


def test_post_read_edit_equals_editing_the_cache_between_decode_steps(model_and_golden):
    model, golden = model_and_golden
    tokens, layer, t = golden["tokens"], 2, 9
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    m = torch.randn(d_k, d_v, generator=torch.Generator().manual_seed(0))
    sparse = torch.sparse_coo_tensor(torch.tensor([[1], [t], [3]]), m[None], (2, tokens.shape[1], 4, d_k, d_v),
                                     check_invariants=True)
    hook = (f"blocks.{layer}.mixer.hook_post_read_add", lambda x, hook: x + sparse)
    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[hook])
        cache = model.empty_cache()
        prefix = model(tokens[:, : t + 1], cache=cache)
        state = cache.layers[layer]["state"].clone()
        state[1, 3] += m
        cache.layers[layer]["state"] = state
        rest = model(tokens[:, t + 1 :], cache=cache)
    assert relative_error(torch.cat([prefix, rest], 1), edited) < 1e-5
    assert torch.equal(edited[0], golden["logits"][0]) or relative_error(edited[0], golden["logits"][0]) < 1e-5
    assert not torch.allclose(edited[1, t + 1 :], golden["logits"][1, t + 1 :])


def test_write_edits_leave_the_bonus_and_transition(model_and_golden):
    """In-place edits of k and v replace only the write k v^T: the bonus term (r . (k * r_k)) v and the erase factors
    keep the model's own k and v; the reads follow the naive loop with the edited write."""
    model, golden = model_and_golden
    layer, cells = 1, [(0, 4, 2), (1, 15, 0)]
    names = [f"blocks.{layer}.mixer.{n}" for n in FACTORS + ("hook_bonus", "hook_read")]
    with torch.no_grad():
        _, native = model.run_with_cache(golden["tokens"], names_filter=names)
    gen = torch.Generator().manual_seed(1)
    new = {c: (torch.randn(model.cfg.d_k, generator=gen), torch.randn(model.cfg.d_v, generator=gen)) for c in cells}

    def set_k(x, hook):
        for c, (k, _) in new.items():
            x[c] = k

    def set_v(x, hook):
        for c, (_, v) in new.items():
            x[c] = v

    hooks = [(f"blocks.{layer}.mixer.hook_write_k", set_k), (f"blocks.{layer}.mixer.hook_write_v", set_v)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, edited = model.run_with_cache(golden["tokens"], names_filter=names)
    for n in ("hook_bonus", "hook_decay", "hook_erase_a", "hook_erase_b"):
        assert torch.equal(edited[f"blocks.{layer}.mixer.{n}"], native[f"blocks.{layer}.mixer.{n}"])
    f = [native[f"blocks.{layer}.mixer.{n}"] for n in FACTORS]
    write_k, write_v = f[1].clone(), f[2].clone()
    for c, (k, v) in new.items():
        write_k[c], write_v[c] = k, v
    reads, _, _ = naive_rwkv7_layer(*f, write_k=write_k, write_v=write_v)
    assert relative_error(edited[f"blocks.{layer}.mixer.hook_read"], reads.float()) < 1e-5


def test_layer0_write_edit_leaves_v_first(model_and_golden):
    """Layer 0's v is both its write value and the v-first every later layer reads: an in-place write edit there
    changes only layer 0's write, not the v-first that layer 1 reads."""
    model, golden = model_and_golden
    seen = {}

    def look(x, hook):  # runs inside layer 1: what v-first does it read?
        seen[len(seen)] = model._v_first.value.clone()

    def zero_v(x, hook):
        x[:, 3:8] = 0.0

    with torch.no_grad():
        with model.hooks(fwd_hooks=[("blocks.1.mixer.hook_write_k", look)]):
            model(golden["tokens"])
        with model.hooks(fwd_hooks=[("blocks.0.mixer.hook_write_v", zero_v), ("blocks.1.mixer.hook_write_k", look)]):
            model(golden["tokens"])
    assert torch.equal(seen[0], seen[1])


def test_other_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba2"}')
    with pytest.raises(ValueError, match="rwkv7"):
        HookedRWKV7.from_pretrained(tmp_path)


def test_cache_snapshots_continue_like_the_full_run(model_and_golden):
    """request_snapshots keeps the state and both token-shift inputs before chosen positions; one decoding step from
    each snapshot row reproduces the full run's logits there."""
    model, golden = model_and_golden
    tokens = golden["tokens"][:1]
    positions = [0, 5, 12]
    cache = model.empty_cache()
    cache.request_snapshots(positions, range(model.cfg.n_layers))
    with torch.no_grad():
        model(tokens, cache=cache)
        rows = cache.rows_from_snapshots(torch.arange(len(positions)))
        step = model(tokens[0, positions][:, None], cache=rows)  # [rows, 1, vocab]
    assert relative_error(step[:, 0], golden["logits"][0, positions]) < 1e-5


def test_snapshots_per_batch_row_continue_like_the_full_run(model_and_golden):
    """Per-row snapshot positions [batch, n_sel]: a step from any row's snapshot reproduces that row's logits."""
    model, golden = model_and_golden
    tokens = golden["tokens"]  # [2, pos]
    per_row = torch.tensor([[0, 5, 12], [3, 19, 3]])
    cache = model.empty_cache()
    cache.request_snapshots(per_row, range(model.cfg.n_layers))
    which, rows = torch.tensor([1, 0, 2, 1]), torch.tensor([1, 0, 0, 0])
    with torch.no_grad():
        model(tokens, cache=cache)
        made = cache.rows_from_snapshots(which, rows)
        starts = per_row[rows, which]
        step = model(tokens[rows, starts][:, None], cache=made)  # [rows, 1, vocab]
    assert relative_error(step[:, 0], golden["logits"][rows, starts]) < 1e-5
