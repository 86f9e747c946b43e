"""What every hooked family promises, checked on each (Qwen3.5 hybrid, Mamba-2, RWKV-7; non-square heads): clear
errors for bad input, hooks that never outlive their context, the state trajectory built only when listened to, the
calls SAELens makes, checkpoint loading that names every missing, unexpected or mis-shaped weight, and generation
(with and without a cache; greedy equal to transformers where it is the reference). What only one
family has (its hook points, its config checks) is tested in that family's own files."""

from pathlib import Path

import pytest
import torch

from writesae_lens.adapters.mamba2 import HookedMamba2
from writesae_lens.adapters.qwen35 import HookedQwen35
from writesae_lens.adapters.rwkv7 import HookedRWKV7

LAYER = 1
RWKV7_CHECKPOINT = Path(__file__).parent / "fixtures" / "rwkv7_nonsquare" / "checkpoint"


@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def family(request, qwen35_folders, mamba2_folders):
    """(model class, checkpoint folder, loaded model)."""
    cls, folder = {
        "qwen35": (HookedQwen35, qwen35_folders["gqa_nonsquare"]),
        "mamba2": (HookedMamba2, mamba2_folders["grouped_nonsquare"]),
        "rwkv7": (HookedRWKV7, RWKV7_CHECKPOINT),
    }[request.param]
    model = cls.from_pretrained(folder, device="cpu").eval()
    assert model.cfg.d_k != model.cfg.d_v
    return cls, folder, model


def tokens_for(model, n_pos=12, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (2, n_pos), generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model):
    return not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_unknown_hook_name_suggests_close_ones(family):
    _, _, model = family
    with pytest.raises(KeyError, match=rf"blocks\.{LAYER}\.mixer\.hook_write_k"):
        model.run_with_hooks(tokens_for(model), fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write_key", lambda x, hook: x)])
    with pytest.raises(KeyError, match="unknown hook point"):
        model.add_hook("blocks.99.hook_resid_pre", lambda x, hook: x)
    assert no_hooks_left(model)


def test_bad_tokens(family):
    _, _, model = family
    with pytest.raises(TypeError, match="integer dtype"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {model.cfg.d_vocab}\)"):
        model(torch.tensor([[1, model.cfg.d_vocab]]))
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("hello")


def test_bad_hook_outputs_raise_and_leave_no_hooks(family):
    _, _, model = family
    tokens = tokens_for(model)
    mixer = f"blocks.{LAYER}.mixer"
    with pytest.raises(ValueError, match=r"hook_write_v returned .* must keep the shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"{mixer}.hook_write_v", lambda x, hook: x[..., :1])])
    with pytest.raises(ValueError, match="non-finite"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"{mixer}.hook_write_k", lambda x, hook: x * float("nan"))])
    cfg = model.cfg
    late = torch.sparse_coo_tensor(torch.tensor([[0], [20], [0]]), torch.ones(1, cfg.d_k, cfg.d_v),
                                   (2, 21, cfg.n_heads, cfg.d_k, cfg.d_v), check_invariants=True)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"{mixer}.hook_write_add", lambda x, hook: late)])
    assert no_hooks_left(model)


def test_hooks_are_removed_after_an_exception(family):
    _, _, model = family
    tokens = tokens_for(model)

    def broken(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write_v", broken)])
    assert no_hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_state", broken)]):
            model(tokens)
    assert no_hooks_left(model)


def test_state_trajectory_is_built_only_when_listened_to(family, monkeypatch):
    _, _, model = family
    tokens = tokens_for(model, n_pos=40)
    mixer_class = type(model.blocks[LAYER].mixer)
    asked = []
    real = mixer_class._recurrence

    def spy(self, *args, return_trajectory=False, **kwargs):
        asked.append(return_trajectory)
        return real(self, *args, return_trajectory=return_trajectory, **kwargs)

    monkeypatch.setattr(mixer_class, "_recurrence", spy)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_write_k", "hook_resid_post")))
    assert asked and not any(asked)
    assert not any(n.endswith("hook_state") for n in cache)
    asked.clear()
    with torch.no_grad():
        model.run_with_cache(tokens, names_filter=f"blocks.{LAYER}.mixer.hook_state")
    assert asked.count(True) == 1


def test_sae_lens_style_calls(family):
    """The calls SAELens' ActivationsStore and evals make."""
    _, _, model = family
    tokens = tokens_for(model, n_pos=30)
    hook = f"blocks.{LAYER}.mixer.hook_state"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=LAYER + 1, prepend_bos=False)
        _, loss = model(tokens, return_type="both", loss_per_token=True)
    assert cache[hook][:, :, 1].shape == (2, 30, model.cfg.d_k * model.cfg.d_v)  # hook_head_index=1
    assert loss.shape == (2, 29)
    assert model.W_E.shape == (model.cfg.d_vocab, model.cfg.d_model)
    assert model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)


def test_missing_folder_and_file(family, tmp_path):
    cls, _, _ = family
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        cls.from_pretrained(tmp_path / "nowhere" / "deeper")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        cls.from_pretrained(tmp_path / "weights.bin")


def tampered_checkpoint(source: Path, target: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    change(weights)
    save_file(weights, target / "model.safetensors")
    return target


def test_checkpoint_errors_name_every_bad_weight(family, tmp_path):
    cls, folder, _ = family
    layer0 = lambda weights: sorted(k for k in weights if ".layers.0." in k and weights[k].dim() == 2)  # noqa: E731

    def drop_and_add(weights):
        weights.pop(layer0(weights)[0])
        weights["model.layers.0.surprise"] = torch.zeros(2)

    with pytest.raises(ValueError) as err:
        cls.from_pretrained(tampered_checkpoint(folder, tmp_path / "broken", drop_and_add))
    assert "missing" in str(err.value) and "model.layers.0.surprise" in str(err.value)

    def reshape(weights):
        name = layer0(weights)[0]
        weights[name] = weights[name][:, :-1].contiguous()
        reshape.name = name

    with pytest.raises(ValueError, match="shape mismatches") as err:
        cls.from_pretrained(tampered_checkpoint(folder, tmp_path / "reshaped", reshape))
    assert reshape.name in str(err.value)


def test_generation_without_cache_equals_with_cache(family):
    _, _, model = family
    prompt = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False,
                              use_past_kv_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pair", ["qwen35_pair", "mamba2_pair"])
def test_greedy_generation_matches_transformers(pair, request):
    """20 greedy tokens equal transformers' ``generate`` (RWKV-7's reference needs triton: its cached continuation is
    checked against fla's golden logits in test_rwkv7_parity.py)."""
    hf, model = request.getfixturevalue(pair)
    prompt = torch.tensor([[5, 17, 33, 2, 8, 71, 9]])
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20, eos_token_id=None,
                          pad_token_id=0)
    ours = model.generate(prompt, max_new_tokens=20, do_sample=False, stop_at_eos=False, verbose=False)
    assert ours.shape == (1, 27)
    assert torch.equal(ours, ref)


def test_final_positions_equal_the_full_run_and_leave_the_same_cache(family):
    """``final_positions`` returns the full run's logits at those positions (the last block may skip the others)
    and updates the cache exactly as the full run does; bad selections are refused."""
    _, _, model = family
    tokens = tokens_for(model, n_pos=14)
    positions = torch.tensor([[3, 0, 13], [7, 7, 2]])  # per row, unsorted, repeated
    rows = torch.arange(2)[:, None]
    with torch.no_grad():
        full_cache, kept_cache = model.empty_cache(), model.empty_cache()
        full = model(tokens[:, :10], cache=full_cache)
        kept = model(tokens[:, :10], cache=kept_cache, final_positions=positions.clamp(max=9))
        assert kept.shape == (2, 3, model.cfg.d_vocab)
        assert torch.allclose(kept, full[rows, positions.clamp(max=9)], atol=1e-5)
        later_full = model(tokens[:, 10:], cache=full_cache)
        later_kept = model(tokens[:, 10:], cache=kept_cache, final_positions=torch.tensor([[3, 1], [0, 2]]))
        assert torch.allclose(later_kept, later_full[rows, torch.tensor([[3, 1], [0, 2]])], atol=1e-5)
        whole = model(tokens)
        assert torch.allclose(model(tokens, final_positions=positions), whole[rows, positions], atol=1e-5)
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=1, final_positions=positions)
    with pytest.raises(ValueError, match=r"lie in \[0, 14\)"):
        model(tokens, final_positions=positions + 1)
    with pytest.raises(ValueError, match=r"integer tensor \[batch=2, n_sel\]"):
        model(tokens, final_positions=positions.float())
    with pytest.raises(ValueError, match="loss"):
        model(tokens, return_type="loss", final_positions=positions)


def test_head_write_factors_equal_the_write_hooks(family):
    """Where a mixer computes one head's write factors by itself (the substitution test's scan uses it), they equal
    what the write hooks show in a forward pass, for every head (GQA / grouped heads, d_k != d_v)."""
    _, _, model = family
    mixer = model.blocks[LAYER].mixer
    if not mixer.has_head_write_factors:
        with pytest.raises(NotImplementedError, match="capture the write hooks"):
            mixer.head_write_factors(torch.zeros(1, 2, model.cfg.d_model), 0)
        return
    names = ("write_k", "write_v", "write_beta", "decay")
    tokens = tokens_for(model, n_pos=40)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(f"blocks.{LAYER}.")
                                        and (n.endswith("hook_resid_pre") or n.split(".hook_")[-1] in names))
        x = model.blocks[LAYER].mixer_input(cache[f"blocks.{LAYER}.hook_resid_pre"])
        for head in range(model.cfg.n_heads):
            factors = mixer.head_write_factors(x, head)
            for name in names:
                hooked = cache[f"blocks.{LAYER}.mixer.hook_{name}"][:, :, head : head + 1]
                assert factors[name].shape == hooked.shape, name
                assert torch.allclose(factors[name], hooked.float(), atol=1e-6, rtol=1e-5), (name, head)


@pytest.mark.parametrize("pair", ["qwen35_pair", "mamba2_pair"])
def test_loss_return_types_match_transformers(pair, request):
    """return_type "both" / "loss" (mean or per token) / None and stop_at_layer, the loss equal to transformers'
    (the families with a transformers reference)."""
    hf, model = request.getfixturevalue(pair)
    tokens = torch.randint(0, 100, (2, 30), generator=torch.Generator().manual_seed(5))
    logits, loss = model(tokens, return_type="both")
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, 29)
    assert torch.allclose(per_token.mean(), loss)
    with torch.no_grad():
        ref = hf(tokens, labels=tokens).loss
    assert abs(loss.item() - ref.item()) < 1e-4
    assert model(tokens, return_type=None) is None
    assert model(tokens, stop_at_layer=2).shape == (2, 30, model.cfg.d_model)
