"""Hook points of HookedMamba2: shapes, the identities that define them, caching, lifecycle, continuity."""

import pytest
import torch
import torch.nn.functional as F

from closeness import relative_error
from mamba2_factory import CONFIGS


LAYER = 1
FACTORS = ("hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay", "hook_read_q")


@pytest.fixture(scope="module")
def model(mamba2_pair):
    return mamba2_pair[1]


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 100, (2, 70), generator=torch.Generator().manual_seed(21))


@pytest.fixture(scope="module")
def full_cache(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens)[1]


def test_hook_shapes(model, full_cache):
    cfg = model.cfg
    b, p, h = 2, 70, cfg.n_heads
    m = f"blocks.{LAYER}.mixer."
    expected = {
        "hook_embed": (b, p, cfg.d_model),
        f"blocks.{LAYER}.hook_resid_pre": (b, p, cfg.d_model),
        f"blocks.{LAYER}.ln1.hook_scale": (b, p, 1),
        f"blocks.{LAYER}.ln1.hook_normalized": (b, p, cfg.d_model),
        f"blocks.{LAYER}.hook_mixer_out": (b, p, cfg.d_model),
        f"blocks.{LAYER}.hook_resid_post": (b, p, cfg.d_model),
        m + "hook_write_k": (b, p, h, cfg.d_k),
        m + "hook_write_v": (b, p, h, cfg.d_v),
        m + "hook_write_beta": (b, p, h),
        m + "hook_decay": (b, p, h),
        m + "hook_read_q": (b, p, h, cfg.d_k),
        m + "hook_state": (b, p, h, cfg.d_k * cfg.d_v),
        m + "hook_read": (b, p, h, cfg.d_v),
        m + "hook_skip": (b, p, h, cfg.d_v),
        m + "hook_ssm_out": (b, p, h, cfg.d_v),
        m + "hook_gate": (b, p, h, cfg.d_v),
        "ln_final.hook_normalized": (b, p, cfg.d_model),
    }
    for name, shape in expected.items():
        assert tuple(full_cache[name].shape) == shape, name
    assert not any(name.endswith(("hook_write_add", "hook_post_read_add")) for name in full_cache)
    assert not any(name.endswith(("hook_resid_mid", "hook_mlp_out")) for name in model.hook_dict)  # no MLP


def test_write_hooks_define_the_recurrence(model, full_cache):
    """From one run_with_cache: S_t = exp(decay_t) S_{t-1} + beta_t k_t v_t^T, read_t = S_t^T q_t, y = read + skip."""
    m = f"blocks.{LAYER}.mixer."
    k, v, beta, decay, q = (full_cache[m + n] for n in FACTORS)
    cfg = model.cfg
    states = full_cache[m + "hook_state"].reshape(*k.shape[:3], cfg.d_k, cfg.d_v)
    previous = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
    predicted = decay.exp()[..., None, None] * previous + beta[..., None, None] * k[..., :, None] * v[..., None, :]
    assert relative_error(predicted, states) <= 1e-5
    read = full_cache[m + "hook_read"]
    assert relative_error(torch.einsum("bphkv,bphk->bphv", states, q), read) <= 1e-5
    mixer = model.blocks[LAYER].mixer
    assert torch.equal(full_cache[m + "hook_skip"], mixer.D.detach()[:, None] * v)
    assert torch.equal(full_cache[m + "hook_ssm_out"], read + full_cache[m + "hook_skip"])
    # decay = dt * A with A = -exp(A_log), one scalar per head
    assert torch.allclose(decay, -beta * mixer.A_log.detach().exp(), rtol=1e-6, atol=0)


def test_heads_share_their_group_B_and_C(model, full_cache):
    m = f"blocks.{LAYER}.mixer."
    per_group = model.cfg.n_heads // model.cfg.n_groups
    assert per_group == 4
    for name in ("hook_write_k", "hook_read_q"):
        x = full_cache[m + name]
        for head in range(model.cfg.n_heads):
            assert torch.equal(x[:, :, head], x[:, :, (head // per_group) * per_group]), (name, head)
        assert not torch.equal(x[:, :, 0], x[:, :, per_group])


def test_factors_match_transformers_projections(mamba2_pair, tokens, full_cache):
    """dt (after softplus and the clamp) and the gate z are what transformers computes from its in_proj, and the
    SSM output y = read + skip is the input of its gated norm."""
    hf, model = mamba2_pair
    hf_mixer = hf.backbone.layers[LAYER].mixer
    seen = {}
    handles = [
        hf_mixer.in_proj.register_forward_hook(lambda mod, args, out: seen.__setitem__("proj", out)),
        hf_mixer.norm.register_forward_pre_hook(lambda mod, args: seen.__setitem__("norm_in", args)),
    ]
    try:
        with torch.no_grad():
            hf(tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    cfg = model.cfg
    z, _, dt = seen["proj"].split([cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)
    expected_dt = F.softplus(dt + hf_mixer.dt_bias).clamp(*hf_mixer.time_step_limit)
    m = f"blocks.{LAYER}.mixer."
    assert relative_error(full_cache[m + "hook_write_beta"], expected_dt) <= 1e-6
    assert relative_error(full_cache[m + "hook_gate"].flatten(-2), z) <= 1e-6
    y, gate = seen["norm_in"]
    assert relative_error(full_cache[m + "hook_ssm_out"].flatten(-2), y) <= 1e-4
    assert relative_error(full_cache[m + "hook_gate"].flatten(-2), gate) <= 1e-6


def test_time_step_limit_clamps_the_write_strength(mamba2_folders):
    from writesae_lens.adapters.mamba2 import HookedMamba2

    model = HookedMamba2.from_pretrained(mamba2_folders["biased_clamped_tied"])
    tokens = torch.randint(0, 100, (2, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mixer.hook_write_beta")
    dt = cache["blocks.0.mixer.hook_write_beta"]
    assert dt.min().item() == pytest.approx(0.3) and dt.max().item() == pytest.approx(1.2)
    inside = ((dt > 0.3) & (dt < 1.2)).float().mean().item()
    assert 0.0 < inside < 1.0  # both the clamp and the free softplus are exercised


def test_residual_identities(model, full_cache):
    for layer in range(model.cfg.n_layers):
        pre, mixer, post = (full_cache[f"blocks.{layer}.hook_{x}"] for x in ("resid_pre", "mixer_out", "resid_post"))
        assert torch.allclose(pre + mixer, post, atol=1e-6)
        if layer:
            assert torch.equal(full_cache[f"blocks.{layer - 1}.hook_resid_post"], pre)
    assert torch.equal(full_cache["hook_embed"], full_cache["blocks.0.hook_resid_pre"])
    ln = full_cache[f"blocks.{LAYER}.ln1.hook_normalized"] * full_cache[f"blocks.{LAYER}.ln1.hook_scale"]
    assert torch.allclose(ln, full_cache[f"blocks.{LAYER}.hook_resid_pre"], atol=1e-5)


def test_skip_edit_changes_only_the_output(model, tokens, full_cache):
    m = f"blocks.{LAYER}.mixer."
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(m + "hook_skip", lambda x, hook: torch.zeros_like(x))]):
            _, cache = model.run_with_cache(tokens, names_filter=[m + "hook_ssm_out", m + "hook_state"])
    assert torch.equal(cache[m + "hook_ssm_out"], full_cache[m + "hook_read"])
    assert torch.equal(cache[m + "hook_state"], full_cache[m + "hook_state"])


def test_pos_slice_slices_the_position_axis(model, tokens, full_cache):
    names = [f"blocks.{LAYER}.mixer.{n}" for n in ("hook_write_k", "hook_write_beta", "hook_skip")]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, pos_slice=(5, 9), names_filter=names)
    for name in names:
        assert torch.equal(cache[name], full_cache[name][:, 5:9]), name


def test_prefix_then_continue_equals_full_run(model, tokens):
    with torch.no_grad():
        full = model(tokens)
        cache = model.empty_cache()
        parts = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 33), (33, 34), (34, 36), (36, 70))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=2e-5)
    assert cache.seq_len == 70
    assert cache.recurrent_state(LAYER).shape == (2, model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v)


def test_prefix_then_continue_with_clamped_time_steps(mamba2_folders):
    """The clamp applies to single-token steps too (transformers' own decoding step skips it; see docs/hooks.md)."""
    from writesae_lens.adapters.mamba2 import HookedMamba2

    model = HookedMamba2.from_pretrained(mamba2_folders["biased_clamped_tied"])
    tokens = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(tokens)
        cache = model.empty_cache()
        parts = [model(tokens[:, :30], cache=cache)] + [model(tokens[:, t : t + 1], cache=cache) for t in range(30, 40)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=2e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_write_factors_on_every_configuration(mamba2_folders, name):
    """In-projection and conv biases, the time-step limit and every group layout: one head's factors computed from its
    own projection rows equal the write hooks."""
    from writesae_lens.adapters.mamba2 import HookedMamba2

    model = HookedMamba2.from_pretrained(mamba2_folders[name]).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 30), generator=torch.Generator().manual_seed(3))
    names = ("write_k", "write_v", "write_beta", "decay")
    layer = model.cfg.n_layers - 1
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        x = model.blocks[layer].mixer_input(cache[f"blocks.{layer}.hook_resid_pre"])
        for head in range(model.cfg.n_heads):
            factors = model.blocks[layer].mixer.head_write_factors(x, head)
            for n in names:
                hooked = cache[f"blocks.{layer}.mixer.hook_{n}"][:, :, head : head + 1]
                assert torch.allclose(factors[n], hooked, atol=1e-6, rtol=1e-5), (n, head)
