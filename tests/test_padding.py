"""Padding: a left-padded batch gives, at every real position, what each prompt gives alone (fp32 logits to 1e-5,
the cache it leaves behind, and greedy continuations token for token); a right-padded batch without a cache gives
the same logits; the loss leaves the pads out; bad layouts are clear errors. On all three families with non-square
heads and grouped key heads."""

import pytest
import torch

from closeness import relative_error
from rwkv7_factory import random_rwkv7

LENGTHS = (9, 3, 6, 1)  # shorter than, equal to and longer than the conv kernel


def family_model(name: str, qwen35_folders, mamba2_folders):
    """A tiny random model of each family (non-square heads; GQA where the family has it)."""
    if name == "qwen35":
        from writesae_lens.adapters.qwen35 import HookedQwen35

        return HookedQwen35.from_pretrained(qwen35_folders["gqa_nonsquare"], load_tokenizer=False).eval()
    if name == "qwen35-custom-layers":
        from writesae_lens.adapters.qwen35 import HookedQwen35

        return HookedQwen35.from_pretrained(qwen35_folders["square_custom_layers"], load_tokenizer=False).eval()
    if name == "mamba2":
        from writesae_lens.adapters.mamba2 import HookedMamba2

        return HookedMamba2.from_pretrained(mamba2_folders["grouped_nonsquare"], load_tokenizer=False).eval()
    return random_rwkv7(101, seed=3)


FAMILIES = ("qwen35", "qwen35-custom-layers", "mamba2", "rwkv7")


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, qwen35_folders, mamba2_folders):
    torch.set_num_threads(1)
    return family_model(request.param, qwen35_folders, mamba2_folders)


def left_padded(prompts: list[torch.Tensor], pad_id: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return tokens, mask


def prompts_for(model, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.cfg.d_vocab, (n,), generator=generator) for n in LENGTHS]


def test_padded_logits_and_cache_equal_each_prompt_alone(model):
    prompts = prompts_for(model)
    tokens, mask = left_padded(prompts)
    cache = model.empty_cache()
    logits = model(tokens, attention_mask=mask, cache=cache)
    width = tokens.shape[1]
    for row, prompt in enumerate(prompts):
        alone_cache = model.empty_cache()
        alone = model(prompt[None], cache=alone_cache)[0]
        assert relative_error(logits[row, width - len(prompt):], alone) < 1e-5
        # the cache after the prompt: the recurrent states and conv windows (or shifted inputs) of each layer
        for layer, (ours, ref) in enumerate(zip(cache.layers, alone_cache.layers)):
            for name in ("state", "conv", "shift_mixer", "shift_mlp"):
                if name in ref:
                    assert relative_error(ours[name][row], ref[name][0]) < 1e-5, (layer, name)
    assert cache.positions.tolist() == [len(p) for p in prompts]


def test_padding_without_a_cache_matches_too(model):
    prompts = prompts_for(model, seed=1)
    tokens, mask = left_padded(prompts)
    logits = model(tokens, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model(prompt[None])[0]
        assert relative_error(logits[row, tokens.shape[1] - len(prompt):], alone) < 1e-5


def test_padded_greedy_generation_equals_each_prompt_alone(model):
    prompts = prompts_for(model, seed=2)
    tokens, mask = left_padded(prompts)
    out = model.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False, stop_at_eos=False,
                         verbose=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
        assert out[row, tokens.shape[1]:].tolist() == alone[0, len(prompt):].tolist()


def test_pad_positions_carry_no_hook_writes(model):
    """The write interface shows the pads as they act: zero write strength and zero log decay."""
    prompts = prompts_for(model, seed=3)
    tokens, mask = left_padded(prompts)
    layer = next(i for i, block in enumerate(model.blocks) if hasattr(block, "mixer"))
    _, cache = model.run_with_cache(tokens, attention_mask=mask,
                                    names_filter=[f"blocks.{layer}.mixer.hook_write_beta",
                                                  f"blocks.{layer}.mixer.hook_decay"])
    pads = mask == 0
    assert bool((cache[f"blocks.{layer}.mixer.hook_write_beta"][pads] == 0).all())
    assert bool((cache[f"blocks.{layer}.mixer.hook_decay"][pads] == 0).all())


def right_padded(prompts: list[torch.Tensor], pad_id: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
        mask[row, :len(prompt)] = 1
    return tokens, mask


def test_right_padded_logits_equal_each_prompt_alone(model):
    prompts = prompts_for(model, seed=4)
    tokens, mask = right_padded(prompts)
    logits = model(tokens, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        assert relative_error(logits[row, :len(prompt)], model(prompt[None])[0]) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_leaves_the_pads_out(model, side):
    """The mean loss over a padded batch is the mean over every real next-token pair of the prompts alone; per token,
    the pairs touching a pad are 0 (TransformerLens' convention)."""
    prompts = prompts_for(model, seed=5)
    tokens, mask = (left_padded if side == "left" else right_padded)(prompts)
    alone = [model(p[None], return_type="loss", loss_per_token=True)[0] for p in prompts]
    expected = torch.cat(alone).mean()
    loss = model(tokens, attention_mask=mask, return_type="loss")
    assert abs(float(loss) - float(expected)) < 1e-5 * max(1.0, abs(float(expected)))
    per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    counted = (mask[:, :-1] * mask[:, 1:]).bool()
    assert bool((per_token[~counted] == 0).all())
    logits = model(tokens, attention_mask=mask)
    assert abs(float(model.loss_fn(logits, tokens, attention_mask=mask)) - float(loss)) < 1e-6


def test_right_padding_with_a_cache_is_refused(model):
    with pytest.raises(ValueError, match="right padding cannot be used with a cache"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.empty_cache(),
              attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="pads prompts on the left"):
        model.generate(torch.zeros(2, 3, dtype=torch.long), padding_side="right", max_new_tokens=1, verbose=False)


@pytest.mark.parametrize("mask,match", [
    ([[1, 0, 1], [1, 1, 1]], "same side"),
    ([[0, 1, 1], [1, 1, 0]], "same side"),
    ([[0, 0, 0], [1, 1, 1]], "no real token"),
    ([[0, 2, 1], [1, 1, 1]], "only 0"),
    ([[0, 1], [1, 1]], "must match"),
])
def test_bad_masks_are_clear_errors(model, mask, match):
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        model(tokens, attention_mask=torch.tensor(mask))


def test_padding_is_refused_when_continuing_a_cache(model):
    cache = model.empty_cache()
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="starts a sequence"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))


def test_unknown_keyword_arguments_are_errors(model):
    """TransformerLens' ``past_kv_cache`` is accepted (it is the state cache); anything unknown raises."""
    with pytest.raises(TypeError, match="unexpected keyword argument 'shortformer_pos_embed'"):
        model(torch.zeros(1, 3, dtype=torch.long), shortformer_pos_embed=None)
    with pytest.raises(TypeError, match="RecurrentCache"):
        model(torch.zeros(1, 3, dtype=torch.long), past_kv_cache=object())
    with pytest.raises(ValueError, match="not both"):
        model(torch.zeros(1, 3, dtype=torch.long), past_kv_cache=model.empty_cache(), cache=model.empty_cache())
